"""Factor a fake-quantized weight back into element codes and scales, exactly.

A run leaves each quantized linear holding Ŵ = codes x scales, dequantized in fp32 (harness.quant). To
serve it, the codes and scales are needed again. They are not kept (GPTQ, clip searches and MSE observers
choose scales the weight alone does not reveal), so they are recovered from Ŵ and *checked*: a factoring
counts only when codes x scales, computed as the serving format dequantizes, equals Ŵ bit for bit.

- fp32 scales (INT rows/groups, FP8 rows/tensor): the group's largest |Ŵ| is some code c times s, so
  s is fl(max|Ŵ| / c) to within an ulp; each candidate (c among the largest codes, +-2 ulps) is tried, and
  a group takes the first that reproduces it. Any exact (codes, s) pair will do: it dequantizes to Ŵ.
- E8M0 scales (MX): s = 2^k; the smallest k that keeps the group within the element's range is tried
  first, then larger ones (a group of small codes has several exact exponents; all dequantize alike).
- Asymmetric INT: s from the group's range (max - min) / L, zero point = -min code.
- E4M3 block scales (NV): the harness dequantizes with code x s_t (torchao's and NVIDIA's kernels'
  convention); compressed-tensors dequantizes with code / global_scale. The two agree only where
  fl(code / g) = fl(code x s_t) (g with fl(1/g) = s_t; measured: about half the blocks of a random
  weight differ in the last bit, for some s_t none), so NV formats factor *inexactly*: see `factor_nv`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import PtqbenchError
from harness.formats import Format
from harness.formats.elements import round_to_float_element
from harness.formats.spec import FLOAT_ELEMENTS


class FactorError(PtqbenchError):
    """A weight is not codes x scales of its format (it was not fake-quantized with it)."""


@dataclass
class Factored:
    """Ŵ = (codes - zero) x scale per group of `group_size` along the input dim (None: whole row).

    codes: fp32 grid values ([out, in]); scale: fp32 [out, groups] (E8M0: powers of two; NV: the
    effective per-block scale code / global_scale); zero: asymmetric INT zero points (fp32 integers) or
    None; block_code / global_scale: NV only (E4M3 block codes, fp32 global scale).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int | None = None
    block_code: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        groups = self._grouped(self.codes)
        if self.zero is not None:
            groups = groups - self.zero[..., None]
        return (groups * self.scale[..., None]).reshape(self.codes.shape)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        size = self.group_size or x.shape[-1]
        return x.reshape(x.shape[0], -1, size)


def _on_grid(q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Per element: is q a value of the format's element (within its range)?"""
    if fmt.element == "int":
        limit = fmt.levels if not fmt.symmetric else fmt.qmax
        low = 0 if not fmt.symmetric else -fmt.qmax
        return (q == torch.round(q)) & (q >= low) & (q <= limit)
    return round_to_float_element(q, fmt.element) == q


def _ulp_neighbours(s: torch.Tensor, steps: int) -> torch.Tensor:
    """s moved by `steps` ulps (fp32 bit pattern arithmetic; s > 0)."""
    return (s.view(torch.int32) + steps).view(torch.float32)


def _top_codes(fmt: Format, count: int) -> list[float]:
    """The `count` largest positive element values of the format."""
    if fmt.element == "int":
        return [fmt.qmax - i for i in range(count) if fmt.qmax - i > 0]
    element = FLOAT_ELEMENTS[fmt.element]
    grid = torch.unique(round_to_float_element(torch.linspace(0, element.max_normal, 4096), element))
    return [v for v in grid.flip(0)[:count].tolist() if v > 0]


def _groups(w: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, int | None]:
    if fmt.granularity == "tensor":
        return w.reshape(1, 1, -1), None
    if fmt.granularity == "row":
        return w.reshape(w.shape[0], 1, w.shape[1]), None
    if w.shape[1] % fmt.group_size:
        raise FactorError(f"input dim {w.shape[1]} is not a multiple of {fmt.name}'s group size {fmt.group_size}")
    return w.reshape(w.shape[0], -1, fmt.group_size), fmt.group_size


def _solve(groups: torch.Tensor, candidates, fmt: Format, zero_of=None):
    """First candidate scale per group that reproduces it: (codes, scale, zero, solved mask)."""
    scale = torch.ones(groups.shape[:2], dtype=torch.float32)
    zero = torch.zeros_like(scale) if zero_of else None
    codes = torch.zeros_like(groups)
    solved = groups.eq(0).all(-1)  # zero groups: codes 0, scale 1
    for s in candidates:
        if bool(solved.all()):
            break
        s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
        q = torch.round(groups / s[..., None]) if fmt.element == "int" else round_to_float_element(
            groups / s[..., None], fmt.element)
        z = zero_of(q) if zero_of else None
        shifted = q + z[..., None] if zero_of else q
        ok = (_on_grid(shifted, fmt) & ((q * s[..., None]) == groups)).all(-1) & ~solved
        codes[ok] = shifted[ok]
        scale[ok] = s[ok]
        if zero_of:
            zero[ok] = z[ok]
        solved |= ok
    return codes, scale, zero, solved


def _check_solved(solved: torch.Tensor, name: str, fmt: Format) -> None:
    if not bool(solved.all()):
        bad = int((~solved).sum())
        raise FactorError(f"{name}: {bad} of {solved.numel()} groups are not codes x scales of {fmt.name} "
                          f"(was this weight fake-quantized with {fmt.name}?)")


def factor_weight(w: torch.Tensor, fmt: Format, name: str = "weight") -> Factored:
    """The exact (codes, scales[, zero points]) of a fake-quantized [out, in] weight, or FactorError."""
    w = w.detach().float().cpu()
    if fmt.scale_type == "e4m3":
        raise FactorError(f"{name}: {fmt.name} has two-level E4M3 scales: use factor_nv")
    groups, size = _groups(w, fmt)
    amax = groups.abs().amax(-1)
    if fmt.scale_type == "e8m0":
        tiny = torch.where(amax > 0, amax, torch.ones_like(amax))
        first = torch.ceil(torch.log2(tiny / fmt.qmax))
        candidates = (torch.exp2(first + k) for k in range(-1, 12))
        codes, scale, zero, solved = _solve(groups, candidates, fmt)
    elif fmt.symmetric or fmt.element != "int":
        candidates = (_ulp_neighbours(amax / c, step) for c in _top_codes(fmt, 8) for step in (0, 1, -1, 2, -2))
        codes, scale, zero, solved = _solve(groups, candidates, fmt)
    else:
        span = groups.amax(-1) - groups.amin(-1)
        candidates = (_ulp_neighbours(span / levels, step)
                      for levels in range(fmt.levels, max(fmt.levels - 8, 0), -1) for step in (0, 1, -1, 2, -2))

        def zero_of(q):
            return -q.amin(-1)  # the smallest code sits at 0

        codes, scale, zero, solved = _solve(groups, candidates, fmt, zero_of)
    _check_solved(solved, name, fmt)
    return Factored(codes.reshape(w.shape), scale, zero, size)


def factor_nv(w: torch.Tensor, fmt: Format, name: str = "weight") -> tuple[Factored, int]:
    """NVFP4 / NVINT4 as E4M3 block codes over a global scale, compressed-tensors' convention.

    The tensor scale s_t is recovered from the block scales (the harness's S_b = fl(code_b x s_t)); the
    export stores global_scale = fl(1 / s_t), and blocks where fl(code_b / global) != S_b dequantize one
    fp32 rounding away from what was evaluated. Returns (factoring, number of such blocks).
    """
    w = w.detach().float().cpu()
    groups, size = _groups(w, fmt)
    # first, the exact effective block scale S_b of every block (fp32 scale factoring)
    effective = factor_weight(w, fmt.with_(scale_type="fp32", four_over_six=None), name)
    block_scale = effective.scale
    nonzero = ~groups.eq(0).all(-1)
    e4m3_codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3_codes = e4m3_codes[e4m3_codes > 0]
    s_t = _tensor_scale(block_scale[nonzero], e4m3_codes)
    if s_t is None:
        raise FactorError(f"{name}: no single tensor scale makes every block scale an E4M3 code times it")
    code = torch.where(nonzero, round_to_float_element(block_scale / s_t, "e4m3"), torch.ones_like(block_scale))
    global_scale = _reciprocal_preimage(s_t)
    served = code / global_scale
    inexact = int((nonzero & (served != block_scale)).sum())
    # the element codes are those of the exact block scale; only the block scale is served differently
    return Factored(effective.codes, served, None, size, code, global_scale), inexact


def _reciprocal_preimage(s_t: torch.Tensor) -> torch.Tensor:
    """A global scale g with fl(1/g) = s_t where one exists (a kernel that multiplies by 1/g, as NVFP4
    GEMMs do with their alpha, then uses the harness's s_t exactly); else fl(1/s_t)."""
    g = torch.ones((), dtype=torch.float32) / s_t
    for step in (0, 1, -1, 2, -2):
        candidate = _ulp_neighbours(g.reshape(()), step)
        if bool(torch.ones((), dtype=torch.float32) / candidate == s_t):
            return candidate
    return g


def _tensor_scale(block_scale: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
    """The s_t with block_scale = fl(code x s_t) for E4M3 codes: tried from the largest block (code 448
    unless the whole tensor is small), then smaller codes."""
    if block_scale.numel() == 0:
        return torch.ones((), dtype=torch.float32)
    top = block_scale.max()
    for c in codes.flip(0)[:16]:
        for step in (0, 1, -1, 2, -2):
            s_t = _ulp_neighbours((top / c).reshape(()), step)
            code = round_to_float_element(block_scale / s_t, "e4m3")
            if bool(((code * s_t) == block_scale).all()):
                return s_t
    return None
