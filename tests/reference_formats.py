"""Independent reference for the number formats: a plain per-group loop in numpy / Python.

Written separately from harness/formats on purpose: element rounding comes from ml_dtypes casts
(and torch's float8_e4m3fn cast for NV block scales), scale exponents from exact rational
arithmetic (fractions.Fraction), INT rounding from numpy. Slow, obvious, and only for tests.

Also covers the E8M0 rule floor43 (FP-Quant's MXFP4: the floor exponent's power of two / 0.75) and
Four Over Six NVFP4 (Cook et al. 2025, after mit-han-lab/fouroversix's PyTorch reference): per block
the E4M3 code for amax -> 6 and for amax -> 4 (ratio x 1.5), over a tensor scale capped at 256 instead
of 448, keeping the one with the lower error. The errors follow the harness' stated definition
(fp64 differences, fp64 sums left to right) with plain Python floats.
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
    if rule in ("floor", "floor43"):
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
        cap = 256.0 if getattr(fmt, "four_over_six", None) else 448.0
        tensor_scale = F32(np.abs(groups).max()) / F32(fmt.qmax * cap)
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
    if fmt.scale_type == "e4m3" and getattr(fmt, "four_over_six", None):
        return _reference_four_over_six(g, amax, fmt.four_over_six, tensor_scale)
    if fmt.scale_type == "e4m3":
        ratio = F32(F32(amax / F32(fmt.qmax)) / tensor_scale)
        scale, inv = _e4m3_code_scales(ratio, tensor_scale)
        y = (g * inv).astype(np.float64)
    else:
        if amax == 0:
            return g * F32(0)
        if fmt.scale_type == "e8m0":
            scale = F32(2.0 ** e8m0_exponent(float(amax), fmt.qmax, fmt.scale_rounding))
            if fmt.scale_rounding == "floor43":
                scale = F32(scale / F32(0.75))  # fp32 division; elements below divide by it too
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


def _e4m3_code_scales(ratio, tensor_scale):
    """(scale, inv) of an NVFP4 block from its fp32 ratio (amax/qmax)/s_t: E4M3 code by torch's cast."""
    ratio = min(max(float(ratio), 2.0**-6), 448.0)
    code = F32(torch.tensor(ratio).to(torch.float8_e4m3fn).float().item())
    scale = F32(code * tensor_scale)
    inv = F32(F32(F32(1) / tensor_scale) / code)  # NVFP4 kernels multiply by a reciprocal
    return scale, inv


def _reference_four_over_six(g: np.ndarray, amax, metric: str, tensor_scale) -> np.ndarray:
    """One Four Over Six block: dequantize with both candidate codes, keep "4" only if strictly better."""
    ratio6 = F32(F32(amax / F32(6.0)) / tensor_scale)
    ratio4 = F32(ratio6 * F32(1.5))  # block amax maps to 4 instead of 6
    results = []
    for ratio in (ratio6, ratio4):
        scale, inv = _e4m3_code_scales(ratio, tensor_scale)
        q = cast_element((g * inv).astype(np.float64), "e2m1", 6.0)  # ml_dtypes float4_e2m1fn, saturating
        d = (q.astype(np.float32) * scale).astype(np.float32)
        err = 0.0
        for di, xi in zip(d.tolist(), g.tolist()):  # Python floats: IEEE fp64, left to right
            e = abs(di - xi)
            if metric == "mse":
                err += e * e
            elif metric == "mae":
                err += e
            elif metric == "abs_max":
                err = max(err, e)
            else:
                raise ValueError(metric)
        results.append((err, d))
    (err6, d6), (err4, d4) = results
    return d4 if err4 < err6 else d6
