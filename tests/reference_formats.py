"""Independent reference for the number formats: a plain per-group loop in numpy / Python.

Written separately from harness/formats on purpose: element rounding comes from ml_dtypes casts
(and torch's float8_e4m3fn cast for NV block scales), scale exponents from exact rational
arithmetic (fractions.Fraction), INT rounding from numpy. Slow, obvious, and only for tests.
"""
from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import torch

ML_DTYPES = {
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
}
F32 = np.float32


def cast_element(y: np.ndarray, element: str, qmax: float) -> np.ndarray:
    """Round float64 values onto the element grid with saturation (ml_dtypes does the RNE)."""
    clipped = np.clip(y, -qmax, qmax)
    return clipped.astype(ML_DTYPES[element]).astype(np.float64)


def _ceil_log2_ratio(amax: Fraction, qmax: Fraction) -> int:
    k = math.floor(math.log2(amax / qmax)) - 2
    while amax > qmax * Fraction(2) ** k:
        k += 1
    return k


def e8m0_exponent(amax: float, qmax: float, rule: str) -> int:
    a, q = Fraction(amax), Fraction(qmax)
    emax = math.floor(math.log2(qmax))
    if rule == "floor":
        k = math.frexp(amax)[1] - 1 - emax
    elif rule == "ceil":
        k = _ceil_log2_ratio(a, q)
    elif rule == "round":
        k = _ceil_log2_ratio(a, q)
        # log2(a/q) < k - 1/2  <=>  (a/q)^2 < 2^(2k-1)
        if (a / q) ** 2 < Fraction(2) ** (2 * k - 1):
            k -= 1
    elif rule == "rceil":
        r = Fraction(float(F32(amax) / F32(qmax)))
        k = _ceil_log2_ratio(r, Fraction(1)) if r > 0 else -127
    else:
        raise ValueError(rule)
    return min(max(k, -127), 127)


def reference_quantize(x: torch.Tensor, fmt) -> torch.Tensor:
    """Fake-quantize like harness.formats.quantize, one group at a time."""
    arr = x.detach().float().cpu().numpy().astype(np.float32)
    shape = arr.shape
    if fmt.granularity == "tensor":
        groups = arr.reshape(1, -1)
    elif fmt.granularity == "row":
        groups = arr.reshape(-1, shape[-1])
    else:
        groups = arr.reshape(-1, fmt.group_size)
    out = np.empty_like(groups)
    tensor_scale = None
    if fmt.scale_type == "e4m3":
        tensor_scale = F32(np.abs(groups).max()) / F32(fmt.qmax * 448.0)
        if tensor_scale == 0:
            tensor_scale = F32(1.0)
    for i, g in enumerate(groups):
        out[i] = _reference_group(g, fmt, tensor_scale)
    return torch.from_numpy(out.reshape(shape)).to(x.dtype)


def _reference_group(g: np.ndarray, fmt, tensor_scale) -> np.ndarray:
    if not np.all(np.isfinite(g)):
        return np.full_like(g, np.nan)
    clip = F32(fmt.clip_ratio)
    if not fmt.symmetric:
        lo = F32(min(g.min(), F32(0))) * clip
        hi = F32(max(g.max(), F32(0))) * clip
        scale = F32(F32(hi - lo) / F32(fmt.levels))
        if scale == 0:
            return np.zeros_like(g)
        zero = np.round(np.float64(F32(-lo / scale)))
        q = np.clip(np.round(g / scale) + zero, 0, fmt.levels) - zero  # fp32 division, RNE
        return (q.astype(np.float32) * scale).astype(np.float32)
    amax = F32(np.abs(g).max()) * clip
    if fmt.scale_type == "e4m3":
        ratio = F32(F32(amax / F32(fmt.qmax)) / tensor_scale)
        ratio = min(max(float(ratio), 2.0**-6), 448.0)
        code = F32(torch.tensor(ratio).to(torch.float8_e4m3fn).float().item())
        scale = F32(code * tensor_scale)
        inv = F32(F32(F32(1) / tensor_scale) / code)  # NVFP4 kernels multiply by a reciprocal
        y = (g * inv).astype(np.float64)
    else:
        if amax == 0:
            return g * F32(0)
        if fmt.scale_type == "e8m0":
            scale = F32(2.0 ** e8m0_exponent(float(amax), fmt.qmax, fmt.scale_rounding))
        else:
            scale = F32(amax / F32(fmt.qmax))
            if scale == 0:  # underflow: the group dequantizes to zeros
                return np.zeros_like(g)
        y = (g / scale).astype(np.float64)
    if fmt.element == "int":
        q = np.clip(np.round(y), -fmt.qmax, fmt.qmax)
    else:
        q = cast_element(y, fmt.element, fmt.qmax)
    return (q.astype(np.float32) * scale).astype(np.float32)
