"""Fake quantization (quantize -> dequantize) along the last dimension, vectorised torch.

`quantize(x, fmt)` is the entry point. `compute_params` / `quantize_with_params` split it in two
so that solvers such as GPTQ can fix a group's scale and then quantize column by column.

Four Over Six (`Format.four_over_six`, NVFP4 only) is decided in `compute_params`, which sees the
group's values: each block gets the E4M3 scale of candidate "6" (block amax -> 6, the plain NVFP4
code) or candidate "4" (code of 1.5 x that ratio, block amax -> 4), whichever dequantizes the block
with the lower error; quantize_with_params then just applies the chosen scale.

Sizes: for group formats the last dimension must be a multiple of the group size; anything else
is an error rather than silent padding, because padding would change the block statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import InvalidValueError
from harness.formats.elements import round_to_float_element, round_to_int
from harness.formats.scales import (
    FOUR_OVER_SIX_EXPANSION,
    divide,
    e4m3_block_scale,
    e8m0_scale,
    fp32_scale,
    nv_tensor_scale,
)
from harness.formats.spec import Format


@dataclass
class QuantParams:
    """Per-group scale (and zero point for asymmetric INT), broadcastable against the group.

    `inv_scale`, when set, is what elements are multiplied by before rounding (NVFP4 kernels use a
    reciprocal rather than a division); otherwise elements are divided by `scale`.
    """

    scale: torch.Tensor
    zero: torch.Tensor | None = None
    inv_scale: torch.Tensor | None = None


def _group_amax(x: torch.Tensor) -> torch.Tensor:
    # torch.amax propagates NaN; Inf shows up as amax = Inf. Both poison the group's scale.
    return x.abs().amax(dim=-1, keepdim=True)


def compute_params(x: torch.Tensor, fmt: Format, tensor_amax: torch.Tensor | None = None) -> QuantParams:
    """Scale (and zero point) for groups laid out along the last dim of `x` (one group = whole last dim).

    For the two-level E4M3 formats `tensor_amax` is the amax of the whole tensor the group came
    from (defaults to the amax of `x`).
    """
    x = x.float()
    if not fmt.symmetric:
        lo = torch.clamp_max(x.amin(dim=-1, keepdim=True), 0) * fmt.clip_ratio
        hi = torch.clamp_min(x.amax(dim=-1, keepdim=True), 0) * fmt.clip_ratio
        span = hi - lo
        scale = fp32_scale(span, float(fmt.levels))
        zero = torch.round(-lo / scale)
        return QuantParams(scale, zero)
    amax = _group_amax(x) * fmt.clip_ratio
    if fmt.scale_type == "fp32":
        return QuantParams(fp32_scale(amax, fmt.qmax))
    if fmt.scale_type == "e8m0":
        return QuantParams(e8m0_scale(amax, fmt))
    # e4m3 block scale over an fp32 per-tensor scale (NVFP4 / NVINT4)
    if tensor_amax is None:
        tensor_amax = x.abs().amax()
    tensor_scale = nv_tensor_scale(torch.as_tensor(tensor_amax, dtype=torch.float32, device=x.device), fmt)
    tensor_scale = torch.where(tensor_scale == 0, torch.ones_like(tensor_scale), tensor_scale)
    amax_over_qmax = divide(amax, fmt.qmax)
    scale, inv_scale = e4m3_block_scale(amax_over_qmax, tensor_scale)
    six = QuantParams(scale, inv_scale=inv_scale)
    if not fmt.four_over_six:
        return six
    scale, inv_scale = e4m3_block_scale(amax_over_qmax, tensor_scale, FOUR_OVER_SIX_EXPANSION)
    four = QuantParams(scale, inv_scale=inv_scale)
    err6 = block_error(x, quantize_with_params(x, six, fmt), fmt.four_over_six)
    err4 = block_error(x, quantize_with_params(x, four, fmt), fmt.four_over_six)
    pick4 = err4 < err6  # strictly: ties (and NaN groups) keep the plain NVFP4 scale
    return QuantParams(
        torch.where(pick4, four.scale, six.scale), inv_scale=torch.where(pick4, four.inv_scale, six.inv_scale)
    )


def block_error(x: torch.Tensor, dequantized: torch.Tensor, metric: str) -> torch.Tensor:
    """Four Over Six's per-group error ("mse", "mae" or "abs_max") of fp32 `dequantized` against fp32 `x`
    along the last dim, as float64 [..., 1].

    Defined so that every backend gets the same bits, hence the same 4/6 choice: the differences are
    taken in fp64 (exact in practice: the two fp32 operands lie within a factor 2^29 of each other,
    or the dequantized value is 0), squares rounded to fp64, and sums accumulated left to right
    (torch.sum's order is unspecified and differs from a Triton tl.sum). The kernel does the same
    operations in the same order and is compiled without FMA contraction; inductor's CPU build uses
    -ffp-contract=off (the compiled backend's agreement is tested on CPU only). Against exact arithmetic
    the errors are off by ~1e-16 relative, so only near-exact ties could be decided otherwise than by
    the exact comparison, and identically in every backend. (The official reference sums fp32 errors
    with torch.sum, whose order is backend-dependent; its choices can differ from these only where the
    two errors agree to within fp32 rounding.)
    """
    e = dequantized.double() - x.double()
    if metric == "abs_max":
        return e.abs().amax(dim=-1, keepdim=True)  # exact; NaN propagates
    terms = e * e if metric == "mse" else e.abs()
    err = terms[..., :1]
    for j in range(1, terms.shape[-1]):
        err = err + terms[..., j : j + 1]
    return err


def quantize_with_params(x: torch.Tensor, params: QuantParams, fmt: Format) -> torch.Tensor:
    """Fake-quantize `x` with fixed params (fp32 out). Zero scales (fp32 scales that underflowed)
    give zeros, NaN scales NaN."""
    x = x.float()
    scale = params.scale
    zero_scale = scale == 0
    safe = torch.where(zero_scale, torch.ones_like(scale), scale)
    y = x * params.inv_scale if params.inv_scale is not None else x / safe
    if fmt.element == "int":
        if fmt.symmetric:
            q = round_to_int(y, -fmt.qmax, fmt.qmax)
        else:
            # GPTQ's convention: round, then shift by the zero point (rounding y + zero instead differs on
            # ties and where the fp32 sum rounds)
            q = torch.clamp(torch.round(y) + params.zero, 0, fmt.levels) - params.zero
    else:
        q = round_to_float_element(y, fmt.element)
    out = q * safe
    return torch.where(zero_scale, torch.zeros_like(out), out)


def _as_groups(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.granularity == "tensor":
        return x.reshape(1, -1)
    if fmt.granularity == "row":
        return x
    n = x.shape[-1]
    if n % fmt.group_size:
        raise InvalidValueError(
            f"last dimension for {fmt.name} (group size {fmt.group_size})", n, f"a multiple of {fmt.group_size}"
        )
    return x.reshape(*x.shape[:-1], n // fmt.group_size, fmt.group_size)


def quantize_reference_torch(x: torch.Tensor, fmt: Format, tensor_amax: torch.Tensor | None = None) -> torch.Tensor:
    """The pure-torch path (what the Triton kernels must match bit for bit). `tensor_amax`: max |x| over
    the whole tensor, for the two-level E4M3 formats (computed here when not given)."""
    if x.numel() == 0:
        return x.clone()
    groups = _as_groups(x.float(), fmt)
    if fmt.scale_type == "e4m3" and tensor_amax is None:
        tensor_amax = groups.abs().amax()
    params = compute_params(groups, fmt, tensor_amax)
    return quantize_with_params(groups, params, fmt).reshape(x.shape).to(x.dtype)
