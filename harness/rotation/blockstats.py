"""Block statistics and the closed-form transforms of TORQ-style two-level rotations.

Stage 1, inter-block variance equalisation. By the Schur–Horn theorem the diagonals reachable as
diag(Qᵀ Σ Q) over orthogonal Q are exactly the vectors majorised by the eigenvalues of Σ, so equal
per-block energies (a vector majorised by any diagonal of Σ) are always reachable. We construct such a
Q in the spirit of the constructive proofs (Chan & Li): a balancing permutation (largest channels dealt
to the emptiest blocks), then at most B-1 block-pair Givens rotations, each of which mixes slot j of a
block above the mean energy with slot j of a block below it by one angle chosen, with the exact
cross-covariance, to set one of the two blocks exactly to the mean. The result keeps each element
inside a 32-slot structure and equalises block energies exactly (up to float rounding).

Stage 2, intra-block rotation: one R in O(k) shared by every block, chosen among closed-form
candidates (identity, Hadamard, sign-randomised Hadamards, KLT of the pooled in-block covariance
followed by a Hadamard) to maximise the entropy of the E2M1 code histogram of the MXFP4-quantized
rotated calibration activations.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from harness.formats import Format, compute_params, get_format
from harness.transforms import apply_block_rotation, block_diagonal


@dataclass(frozen=True)
class TwoLevel:
    """T = Q_inter (I ⊗ R): `inter` a channel permutation (int64 [d], perm[i] = old channel of new channel i;
    O(d) state) or a dense orthogonal matrix [d, d]; `r` one [b, b] rotation on every block of b channels.
    Applied without forming T when `inter` is a permutation (what keeps d_ff-sized sites O(d_ff))."""

    inter: torch.Tensor
    r: torch.Tensor

    @property
    def is_permutation(self) -> bool:
        return self.inter.dim() == 1

    @property
    def dim(self) -> int:
        return self.inter.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x T."""
        y = x[..., self.inter] if self.is_permutation else x @ self.inter.to(x.dtype)
        return apply_block_rotation(y, self.r)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """x Tᵀ (= x T⁻¹)."""
        y = apply_block_rotation(x, self.r.T)
        if not self.is_permutation:
            return y @ self.inter.to(x.dtype).T
        out = torch.empty_like(y)
        out[..., self.inter] = y
        return out

    def with_block(self, r: torch.Tensor) -> TwoLevel:
        return TwoLevel(self.inter, r)

    def dense(self) -> torch.Tensor:
        q = permutation_matrix(self.inter) if self.is_permutation else self.inter.double()
        return q @ block_diagonal(self.r.double(), self.dim // self.r.shape[0])


def block_energies(cov: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block energy sum_{i in b} Σ_ii for a [d, d] second-moment matrix."""
    return torch.diagonal(cov).reshape(-1, block).sum(-1)


def coefficient_of_variation(values: torch.Tensor) -> float:
    values = values.double()
    return float(values.std(unbiased=False) / values.mean()) if values.mean() != 0 else 0.0


def balancing_permutation(energies: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order that deals channels, largest first, to the block with the least energy so far
    (each block holds `block` channels; ties go to the lowest block). Returns perm with new channel i =
    old channel perm[i]. O(d log(d / block)): a heap of the blocks with free slots."""
    d = energies.numel()
    order = torch.argsort(energies.double(), descending=True).tolist()
    heap = [(0.0, b) for b in range(d // block)]  # (load, block), already a heap
    slots: list[list[int]] = [[] for _ in heap]
    for ch in order:
        load, b = heapq.heappop(heap)
        slots[b].append(ch)
        if len(slots[b]) < block:
            heapq.heappush(heap, (load + float(energies[ch]), b))
    return torch.tensor([ch for s in slots for ch in s], dtype=torch.long)


def permutation_matrix(perm: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """P with x P = x[..., perm] (an orthogonal matrix)."""
    d = perm.numel()
    p = torch.zeros(d, d, dtype=dtype)
    p[perm, torch.arange(d)] = 1.0
    return p


def _rotate_pair(m: torch.Tensor, ia: slice, ib: slice, c: float, s: float) -> None:
    """In place, columns only: m <- m g for the block-pair rotation g (new_a = c a - s b, new_b = s a + c b)."""
    a, b = m[:, ia].clone(), m[:, ib].clone()
    m[:, ia] = c * a - s * b
    m[:, ib] = s * a + c * b


def equalize_blocks(cov: torch.Tensor, block: int, max_steps: int | None = None) -> torch.Tensor:
    """Orthogonal Q (d x d, fp64) with equal per-block energies of Qᵀ Σ Q (see module docstring)."""
    cov = cov.double()
    d = cov.shape[0]
    n_blocks = d // block
    perm = balancing_permutation(torch.diagonal(cov), block)
    q = permutation_matrix(perm)
    sigma = cov[perm][:, perm].clone()  # = Pᵀ Σ P
    target = float(torch.trace(sigma)) / n_blocks
    done: set[int] = set()
    for _ in range(max_steps or n_blocks - 1):
        energy = block_energies(sigma, block)
        free = [i for i in range(n_blocks) if i not in done]
        if len(free) < 2:
            break
        above = max(free, key=lambda i: float(energy[i]))
        below = min(free, key=lambda i: float(energy[i]))
        ea, eb = float(energy[above]), float(energy[below])
        if ea - eb <= 1e-12 * max(abs(target), 1e-30):
            break
        sa = slice(above * block, (above + 1) * block)
        sb = slice(below * block, (below + 1) * block)
        cross = float(torch.diagonal(sigma[sa, sb]).sum())  # sum_j E[x_aj x_bj]
        # new_b = s x_a + c x_b has energy (ea+eb)/2 + (eb-ea)/2 cos(2t) + cross sin(2t); set it to target
        big_a, big_b = (eb - ea) / 2, cross
        radius = math.hypot(big_a, big_b)
        rhs = target - (ea + eb) / 2
        phi = math.atan2(big_b, big_a) + math.acos(max(-1.0, min(1.0, rhs / radius)))
        c, s = math.cos(phi / 2), math.sin(phi / 2)
        _rotate_pair(q, sa, sb, c, s)  # Q <- Q g
        _rotate_pair(sigma, sa, sb, c, s)  # Σ <- gᵀ Σ g: columns, then rows
        _rotate_pair(sigma.T, sa, sb, c, s)
        done.add(below)
    return q


def e2m1_code_entropy(x: torch.Tensor, fmt: Format | str = "mxfp4") -> float:
    """Entropy (bits) of the histogram of E2M1 codes (|code| with sign, ±0 merged: 15 values) of
    x quantized to an E2M1 block format along the last dim (max log2(15) = 3.91 bits)."""
    fmt = get_format(fmt)
    groups = x.float().reshape(-1, fmt.group_size)
    params = compute_params(groups, fmt, tensor_amax=groups.abs().amax())
    scaled = groups * params.inv_scale if params.inv_scale is not None else groups / params.scale
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    from harness.formats import round_to_float_element

    codes = round_to_float_element(scaled, fmt.element)
    index = torch.bucketize(codes.abs(), grid) * torch.sign(codes).to(torch.long)
    counts = torch.bincount((index + 7).flatten(), minlength=15).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def intra_block_candidates(pooled_cov: torch.Tensor, hadamard_k: torch.Tensor, seeds: int = 8) -> dict[str, torch.Tensor]:
    """Closed-form k x k rotations to choose from (all orthogonal, fp64)."""
    k = hadamard_k.shape[0]
    out = {"identity": torch.eye(k, dtype=torch.float64), "hadamard": hadamard_k.double()}
    for s in range(seeds):
        g = torch.Generator().manual_seed(1000 + s)
        signs = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0).double()
        out[f"rand_hadamard_{s}"] = signs[:, None] * hadamard_k.double()  # diag(±1) H
    _, eigvecs = torch.linalg.eigh(pooled_cov.double())
    out["klt_hadamard"] = eigvecs.flip(-1) @ hadamard_k.double()
    return out


def pooled_block_covariance(cov: torch.Tensor, block: int) -> torch.Tensor:
    """Average of the k x k diagonal blocks of Σ (the in-block covariance shared by all blocks)."""
    d = cov.shape[0]
    blocks = cov.double().reshape(d // block, block, d // block, block)
    return torch.stack([blocks[i, :, i, :] for i in range(d // block)]).mean(0)


def choose_intra_block(samples: torch.Tensor, candidates: dict[str, torch.Tensor], block: int,
                       fmt: Format | str = "mxfp4") -> tuple[str, dict[str, float]]:
    """The candidate whose block-diagonal rotation maximises the E2M1 code entropy of `samples`."""
    n, d = samples.shape
    entropies = {}
    for name, r in candidates.items():
        rotated = (samples.double().reshape(n, d // block, block) @ r).reshape(n, d)
        entropies[name] = e2m1_code_entropy(rotated, fmt)
    best = max(entropies, key=entropies.get)
    return best, entropies


def massive_channels(absmax: torch.Tensor, ratio: float) -> torch.Tensor:
    """Channels whose max |x| exceeds `ratio` x the median channel's (massive activations, e.g. an attention
    sink's channels), largest first."""
    absmax = absmax.double()
    idx = (absmax > ratio * absmax.median()).nonzero().flatten()
    return idx[torch.argsort(absmax[idx], descending=True)]


def isolating_permutation(energies: torch.Tensor, massive: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order for MXFP4 blocks: each massive channel opens a block of its own, filled with the
    channels of least energy (the elements its shared scale coarsens matter least there); the remaining
    channels are dealt, largest first, to the least-loaded of the other blocks (energies measured without
    massive tokens). A pure permutation: no channel is spread into another block. perm[i] = old channel of
    new channel i."""
    d = energies.numel()
    n_blocks = d // block
    massive = massive.tolist()[:n_blocks]
    rest = [c for c in torch.argsort(energies.double(), descending=False).tolist() if c not in set(massive)]
    slots: list[list[int]] = [[m] for m in massive]
    for s in slots:  # the quietest channels keep the massive ones company
        while len(s) < block:
            s.append(rest.pop(0))
    free = [[] for _ in range(n_blocks - len(slots))]
    loads = [0.0] * len(free)
    for ch in reversed(rest):  # largest first
        b = min((i for i in range(len(free)) if len(free[i]) < block), key=lambda i: loads[i])
        free[b].append(ch)
        loads[b] += float(energies[ch])
    return torch.tensor([ch for s in slots + free for ch in s], dtype=torch.long)


def klt_hadamard(cov: torch.Tensor, hadamard_d: torch.Tensor) -> torch.Tensor:
    """MambaQuant's KLT-enhanced rotation: eigenvectors of Σ (largest first) times a Hadamard, so that
    every channel of x Q has the same variance (tr Σ / d)."""
    _, eigvecs = torch.linalg.eigh(cov.double())
    return eigvecs.flip(-1) @ hadamard_d.double()


def output_error(sites, t: torch.Tensor | TwoLevel, fmt: Format | str = "mxfp4") -> float:
    """Σ over sites (input rows x [n, d], reader weights W [out, d], input scale γ [d] or None) of the relative
    error that quantizing the rotated input x T to `fmt` adds to the readers' output, the readers seeing
    x diag(γ) (a norm's scale, folded into W by a rotation): ||(Q(xT) - xT) Tᵀ diag(γ) Wᵀ||² / ||x diag(γ) Wᵀ||².
    `t` a dense orthogonal matrix or a `TwoLevel` (applied without forming it). W is used as it is (no copy),
    so the readers can be a model's live weights."""
    from harness.formats import quantize

    fmt = get_format(fmt)
    if not isinstance(t, TwoLevel):
        t = TwoLevel(t.double(), torch.ones(1, 1, dtype=torch.float64))
    total = 0.0
    for x, weights, gamma in sites:
        xt = t.apply(x.double())
        delta = t.apply_transpose(quantize(xt.float(), fmt).double() - xt)
        scaled = x.double()
        if gamma is not None:
            delta, scaled = delta * gamma.double(), scaled * gamma.double()
        for w in weights:
            err = delta.to(w.dtype) @ w.T
            ref = scaled.to(w.dtype) @ w.T
            total += float(err.double().pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))
    return total
