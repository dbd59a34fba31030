"""Fake quantization (quantize -> dequantize) along the last dimension, vectorised torch.

`quantize(x, fmt)` is the entry point. `compute_params` / `quantize_with_params` split it in two
so that solvers such as GPTQ can fix a group's scale and then quantize column by column.

Sizes: for group formats the last dimension must be a multiple of the group size; anything else
is an error rather than silent padding, because padding would change the block statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.errors import InvalidValueError
from harness.formats.elements import round_to_float_element, round_to_int
from harness.formats.scales import divide, e4m3_block_scale, e8m0_scale, fp32_scale, nv_tensor_scale
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
    scale, inv_scale = e4m3_block_scale(divide(amax, fmt.qmax), tensor_scale)
    return QuantParams(scale, inv_scale=inv_scale)


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
