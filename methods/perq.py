"""PeRQ: Permute, Rotate, then Quantize (Sanjeet, Colbert, Monteagudo-Lago, Franco, Umuroglu, Fraser — AMD,
arXiv 2601.22347; v1 "MixQuant") — reconstruction.

No code is public (research/papers-c.md C14); this follows the paper's analysis and method description.
A block Hadamard suppresses an outlier only inside its block, and the worst post-rotation outlier is
smallest when the pre-rotation l1 mass is spread evenly over the blocks. So, per rotation site:

1. m_j = E|x_j| over the calibration tokens (the input the rotated readers quantize).
2. Greedy mass diffusion: channels sorted by m_j, largest first, each dealt to the block with the least
   mass so far that still has a free slot (harness.rotation.blockstats.balancing_permutation).
3. T = P (I ⊗ D H_b): the permutation, then the block Hadamard of BRQ (same seeded signs, so `perq` and
   `brq` with the same seed differ only by P).

Sites: R1, the residual stream (one P for every layer, statistics pooled over the RMS-normalised inputs of
every attention and MLP norm; fused offline with the Hadamard); R4, the down_proj input (one P per layer,
applied online with the block Hadamard, inverse fused into down_proj); R2 per head as BRQ's (no
permutation: a head's block is its whole dimension at head_dim <= block); R3 = I ⊗ H_b on Q/K optionally.

Deviations and their likely effect:
- The paper fuses P into the producer's rows in "permutation-equivariant regions" (gate/up rows for
  down_proj) at zero run-time cost; here R4's P is applied online with the Hadamard. The numbers are the
  same (a permutation commutes with act(gate) * up), only the cost differs.
- MoE experts: no per-expert statistics; their down inputs get the block Hadamard without P (BRQ's R4).
- m_j pools every layer's normalised residual for R1 (the paper calibrates per rotation site; R1 is one
  site shared by all layers, as it must be for a fused residual rotation).
Training-free; weights RTN or GPTQ after the rotation, as BRQ. `metrics`: the coefficient of variation of
the blocks' l1 mass before and after P (residual; mean over layers for down_proj).
"""
from __future__ import annotations

import torch
from pydantic import PositiveInt

from harness.calib import ChannelStats
from harness.registry import register_method
from harness.rotation.blockstats import balancing_permutation, coefficient_of_variation, permutation_matrix
from harness.rotation.install import Rotations
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import block_diagonal, hadamard, random_hadamard


def block_mass_cv(mass: torch.Tensor, block: int) -> float:
    """Coefficient of variation of the per-block l1 mass (0: perfectly even)."""
    return coefficient_of_variation(mass.double().reshape(-1, block).sum(-1))


def _rms_normalised(x: torch.Tensor) -> torch.Tensor:
    """The residual as its readers quantize it once the norm's scale is folded into them: x / rms(x)."""
    x = x.detach().float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@register_method("perq")
class PeRQ(RotationMethod):
    """Mass-diffusion channel permutation, then BRQ's block Hadamard, on the residual stream and down_proj."""

    version = 1
    conformance_params = {"weight_solver": "rtn"}

    class Params(RotationParams):
        block: PositiveInt = 32
        permute_residual: bool = True
        permute_down: bool = True
        rotate_kv: bool = True

    @torch.no_grad()
    def _mass(self, ctx) -> tuple[ChannelStats, list[ChannelStats] | None]:
        """E|x_j| of the normalised residual (pooled over layers) and of each layer's down_proj input."""
        layers = ctx.adapter.layers()
        residual = ChannelStats()
        dense = all(v.experts is None for v in layers)
        down = [ChannelStats() for _ in layers] if dense else None
        handles = []
        for view in layers:
            for norm in (view.attn_norm, view.mlp_norm):
                handles.append(norm.register_forward_hook(lambda _m, args, _o: residual.add(_rms_normalised(args[0]))))
            if dense:
                handles.append(view.mlp_out[0].register_forward_hook(
                    lambda _m, args, _o, i=view.index: down[i].add(args[0])))
        inputs = ctx.calib_inputs()
        device = next(ctx.model.parameters()).device
        try:
            for i in range(0, inputs.shape[0], 4):
                ctx.model(inputs[i:i + 4].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return residual, down

    def _permutation(self, stats: ChannelStats, enabled: bool) -> tuple[torch.Tensor, dict[str, float]]:
        mass, b = stats.absmean.double(), self.params.block
        perm = balancing_permutation(mass, b) if enabled else torch.arange(mass.numel())
        return perm, {"block_l1_cv_before": block_mass_cv(mass, b), "block_l1_cv_after": block_mass_cv(mass[perm], b)}

    def build(self, ctx):
        adapter, seed, p = ctx.adapter, ctx.seed, self.params
        b, d, hd = p.block, adapter.hidden_size, adapter.head_dim
        head_block = min(b, hd)
        residual_stats, down_stats = self._mass(ctx)
        perm, res = self._permutation(residual_stats, p.permute_residual)
        metrics = {f"residual_{k}": v for k, v in res.items()}
        rot = Rotations(
            residual=permutation_matrix(perm) @ block_diagonal(random_hadamard(b, seed), d // b),
            head=block_diagonal(random_hadamard(head_block, seed + 1), hd // head_block),
            qk=block_diagonal(hadamard(head_block), hd // head_block) if p.rotate_kv else None,
            info={"block": b, "seed": seed, "permute_residual": p.permute_residual, "permute_down": p.permute_down},
        )
        down_block = random_hadamard(b, seed + 2)
        if down_stats is None:  # MoE: the experts' down inputs get the block Hadamard alone
            rot.down_kind, rot.down_block = "block", down_block
        else:
            per_layer = [self._permutation(s, p.permute_down) for s in down_stats]
            rot.down_kind = "permuted_block"
            rot.down, rot.down_perm = [down_block] * len(per_layer), [q for q, _ in per_layer]
            for key in per_layer[0][1]:
                metrics[f"down_{key}"] = sum(m[key] for _, m in per_layer) / len(per_layer)
        rot.info["metrics"] = metrics
        return rot
