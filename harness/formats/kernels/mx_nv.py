"""Triton fake-quant kernels for block formats (MX: E8M0 scales; NV: E4M3 block scales).

Each program handles ROWS blocks as a [ROWS, BLOCK] tile. The arithmetic mirrors the torch path
step by step (same fp32 operations, exact exponent logic from the IEEE bit fields, RNE via the
1.5*2^23 trick, correctly rounded division via div_rn), so both give identical bits. Non-finite
blocks are detected explicitly (tl.max does not promise NaN propagation) and become NaN.

Four Over Six (NV branch, FOUR_OVER_SIX > 0) quantizes each block with both candidate scales and
keeps the one with the lower error, computed as harness.formats.quantize.block_error does: fp64
differences, fp64 sums left to right (one column at a time, not tl.sum's tree order). The wrapper
launches with enable_fp_fusion=False so no multiply-add is contracted into an FMA on GPUs; the
other formats' arithmetic is unchanged by that (their products before additions are exact).
"""
from __future__ import annotations

import triton
import triton.language as tl

RNE_MAGIC = 12582912.0  # 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 to nearest even in fp32


@triton.jit
def _floor_log2(a):
    """floor(log2 a) for positive fp32 a (subnormals included), as int32."""
    tiny = a < 1.1754943508222875e-38  # below the smallest normal: scale up exactly by 2^64
    scaled = tl.where(tiny, tl.where(tiny, a, 0.0) * 18446744073709551616.0, a)  # no overflow warnings
    biased = (scaled.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return biased - 127 - tl.where(tiny, 64, 0)


@triton.jit
def _pow2(e):
    """2^e as fp32 for int32 e in [-127, 127] (2^-127 is subnormal)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == -127, 5.877471754111438e-39, normal)


@triton.jit
def _with_sign_of(q, y):
    """|q| with the sign bit of y (so -0.0 survives, as with torch.round / copysign)."""
    sign = y.to(tl.int32, bitcast=True) & -2147483648
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_float_element(y, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXN: tl.constexpr):
    """RNE onto a small float grid with saturation; keeps the sign bit of y."""
    a = tl.abs(y)
    e = tl.maximum(_floor_log2(a), EMIN)
    v = a * _pow2(MBITS - e)  # exact power-of-two scaling
    q = (v + RNE_MAGIC) - RNE_MAGIC
    q = q * _pow2(e - MBITS)
    return _with_sign_of(tl.minimum(q, MAXN), y)


@triton.jit
def _round_int_element(y, QMAX: tl.constexpr):
    q = (tl.abs(y) + RNE_MAGIC) - RNE_MAGIC  # RNE is symmetric: round |y|, then restore the sign
    return _with_sign_of(tl.minimum(q, QMAX), y)


@triton.jit
def _e8m0_exponent(amax, QMAX: tl.constexpr, EMAX_ELEM: tl.constexpr, RULE: tl.constexpr):
    """Shared exponent; RULE 0 floor, 1 ceil, 2 round, 3 rceil, 4 floor43 (see scales.py for definitions)."""
    f = _floor_log2(amax)
    if RULE == 0 or RULE == 4:
        e = f - EMAX_ELEM
    elif RULE == 3:
        ratio = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
        fr = _floor_log2(ratio)
        e = fr + tl.where(ratio != _pow2(tl.maximum(fr, -127)), 1, 0)
    else:
        low = f - EMAX_ELEM
        e = low + tl.where(amax > QMAX * _pow2(tl.minimum(tl.maximum(low, -127), 127)), 1, 0)
        if RULE == 2:
            a64 = amax.to(tl.float64)
            # qmax^2 * 2^(2e-1) in fp64, built as two exact fp32 powers of two
            half = 2 * e - 1
            lo_half = half // 2
            t = (QMAX * QMAX) * _pow2(tl.minimum(tl.maximum(lo_half, -127), 127)).to(tl.float64)
            t = t * _pow2(tl.minimum(tl.maximum(half - lo_half, -127), 127)).to(tl.float64)
            e = e - tl.where(a64 * a64 < t, 1, 0)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _nv_candidate(ratio, s_t, tensor_scale):
    """E4M3 block code from the fp32 ratio (clamped to E4M3's smallest normal .. max): (scale, inv_scale)."""
    ratio = tl.minimum(tl.maximum(ratio, 0.015625), 448.0)
    code = _round_float_element(ratio, 3, -6, 448.0)
    inv_scale = tl.math.div_rn(tl.math.div_rn(tl.full(ratio.shape, 1.0, tl.float32), s_t), code)
    return code * tensor_scale, inv_scale


@triton.jit
def _block_error(x, inv_scale, scale, cols, BLOCK: tl.constexpr, METRIC: tl.constexpr):
    """Per-row error of the e2m1 block quantized with (inv_scale, scale); METRIC 1 mse, 2 mae, 3 abs_max."""
    d = _round_float_element(x * inv_scale[:, None], 1, 0, 6.0) * scale[:, None]
    e = tl.abs(d.to(tl.float64) - x.to(tl.float64))
    if METRIC == 3:
        return tl.max(e, axis=1)
    if METRIC == 1:
        e = e * e
    err = tl.zeros(scale.shape, tl.float64)
    for j in tl.static_range(BLOCK):  # left to right, as the torch path (a masked sum is exact: one term)
        err = err + tl.sum(tl.where(cols[None, :] == j, e, 0.0), axis=1)
    return err


@triton.jit
def block_fake_quant_kernel(
    x_ptr,
    out_ptr,
    tensor_scale_ptr,
    n_blocks,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    IS_INT: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    QMAX: tl.constexpr,
    EMAX_ELEM: tl.constexpr,
    CLIP: tl.constexpr,
    SCALE_KIND: tl.constexpr,  # 0: E8M0 power of two, 1: E4M3 block scale x fp32 tensor scale
    RULE: tl.constexpr,
    FOUR_OVER_SIX: tl.constexpr,  # 0 off, 1 mse, 2 mae, 3 abs_max (NV e2m1 only)
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offsets = rows[:, None] * BLOCK + cols[None, :]
    mask = (rows < n_blocks)[:, None]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    a = tl.abs(x)
    nonfinite = tl.max(tl.where((x != x) | (a == float("inf")), 1, 0), axis=1) > 0
    amax = tl.max(tl.where(a == a, a, 0.0), axis=1) * CLIP
    positive = amax > 0

    if SCALE_KIND == 0:
        safe_amax = tl.where(positive & (~nonfinite), amax, 1.0)
        e = tl.where(positive, _e8m0_exponent(safe_amax, QMAX, EMAX_ELEM, RULE), 0)
        if RULE == 4:
            # floor43: 2^e / 0.75 is not a power of two, so divide (correctly rounded) as the torch path
            scale = tl.where(positive, tl.math.div_rn(_pow2(e), tl.full(amax.shape, 0.75, tl.float32)), 1.0)
            y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
        else:
            scale = _pow2(e)
            y = x * _pow2(-e)[:, None]  # exact: same value as x / scale
    else:
        tensor_scale = tl.load(tensor_scale_ptr)
        s_t = tl.full(amax.shape, 1.0, tl.float32) * tensor_scale
        ratio = tl.math.div_rn(tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), s_t)
        scale, inv_scale = _nv_candidate(ratio, s_t, tensor_scale)
        if FOUR_OVER_SIX > 0:
            scale4, inv_scale4 = _nv_candidate(ratio * 1.5, s_t, tensor_scale)
            err6 = _block_error(x, inv_scale, scale, cols, BLOCK, FOUR_OVER_SIX)
            err4 = _block_error(x, inv_scale4, scale4, cols, BLOCK, FOUR_OVER_SIX)
            pick4 = err4 < err6  # strictly: ties keep the 6-candidate
            scale = tl.where(pick4, scale4, scale)
            inv_scale = tl.where(pick4, inv_scale4, inv_scale)
        y = x * inv_scale[:, None]

    if IS_INT:
        q = _round_int_element(y, QMAX)
    else:
        q = _round_float_element(y, MBITS, EMIN, QMAX)
    out = q * scale[:, None]
    out = tl.where(nonfinite[:, None], float("nan"), out)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
