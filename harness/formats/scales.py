"""Scale selection for every scale type.

E8M0 (OCP MX shared exponent) rules, with amax the group's max |x| (times clip_ratio) and qmax the
element's largest magnitude, emax_elem = floor(log2 qmax):
  floor : 2^(floor(log2 amax) - emax_elem)   OCP MX v1.0; the largest elements can saturate (up to ~2x)
  ceil  : 2^ceil(log2(amax / qmax))          exact; the smallest power of two that never clips
  round : 2^round(log2(amax / qmax))         exact rounding in the log domain; can clip
  rceil : 2^ceil(log2(fl32(amax / qmax)))    as hardware does it (fp32 division, then round up:
                                             NVIDIA cvt.rp.ue8m0 / torchao RCEIL); equals ceil except
                                             when the fp32 quotient rounds down onto a power of two
  floor43: fl32(2^(floor(log2 amax) - emax_elem) / 0.75)
                                             IST-DASLab FP-Quant's MXFP4 rule (MR-GPTQ): the floor
                                             exponent times a fixed global scale 4/3, so amax/scale is
                                             in [3, 6) for e2m1 and no element ever saturates (for every
                                             element type amax/scale < 1.5 * 2^emax_elem <= qmax). Not a
                                             power of two: elements are divided by it (fp32, correctly
                                             rounded), then rounded onto the grid.
Exponents are clamped to the E8M0 range [-127, 127]. Every rule is computed with exact integer and
fp32 logic (no log2 approximations), so the torch path and the Triton kernels agree bit for bit.

Non-finite inputs: a group whose amax is NaN or Inf gets a NaN scale, so the whole group
dequantizes to NaN (the OCP MX behaviour: the shared scale becomes the NaN encoding).
All-zero groups get scale 1 and dequantize to exact zeros.

E4M3 (NVFP4 / NVINT4): an fp32 per-tensor scale s_t = amax_tensor / (qmax * 448) and per-block E4M3
codes (see e4m3_block_scale). With Four Over Six the cap is 256 instead of 448, which leaves the
block codes room for the 4-candidate (amax mapped to 4: code x 1.5) without overflowing E4M3.
"""
from __future__ import annotations

import math

import torch

from harness.formats.elements import round_to_float_element
from harness.formats.spec import E8M0_MAX_EXP, E8M0_MIN_EXP, FLOAT_ELEMENTS, Format

E4M3_MAX = FLOAT_ELEMENTS["e4m3"].max_normal
FOUR_OVER_SIX_E4M3_MAX = 256.0  # the official reference's E4M3_MAX_FOUROVERSIX
FOUR_OVER_SIX_EXPANSION = 1.5  # candidate "4": block amax maps to 4 = 6 / 1.5 (official scale_expansion_factor)
FLOOR43_DIVISOR = 0.75  # floor43: scale = 2^k / 0.75


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) for positive finite fp32 a, as int32 (exact, subnormals included)."""
    subnormal = a < 2.0**-126
    a = torch.where(subnormal, a * 2.0**24, a)  # exact: brings subnormals into the normal range
    field = (a.view(torch.int32) >> 23) & 0xFF
    return field - 127 - subnormal.to(torch.int32) * 24


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for int32 e in [-149, 127], built from bits (exact, fp32 subnormals included)."""
    exponent = exponent.to(torch.int32)
    normal = ((torch.clamp(exponent, -126, 127) + 127) << 23).view(torch.float32)
    # below 2^-126: 2^(e+24) is normal, and multiplying by 2^-24 is exact down to 2^-149
    tiny = ((torch.clamp(exponent + 24, -126, 127) + 127) << 23).view(torch.float32) * 2.0**-24
    return torch.where(exponent < -126, tiny, normal)


def divide(a: torch.Tensor, scalar: float) -> torch.Tensor:
    """a / scalar as a correctly rounded fp32 division (CUDA turns a Python-scalar divisor into a
    multiplication by its reciprocal, which rounds differently)."""
    return a / torch.tensor(scalar, dtype=torch.float32, device=a.device)


def e8m0_exponent(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The shared E8M0 exponent (int32) of each group, for positive finite fp32 amax."""
    qmax = fmt.qmax
    rule = fmt.scale_rounding
    f = floor_log2(amax)
    if rule in ("floor", "floor43"):
        exponent = f - fmt.emax_elem
    elif rule == "rceil":
        ratio = divide(amax, qmax)  # fp32, round-to-nearest: the hardware's quotient
        exponent = floor_log2(ratio) + (ratio != _pow2(floor_log2(ratio))).to(torch.int32)
        exponent = torch.where(ratio == 0, E8M0_MIN_EXP, exponent)  # quotient underflowed
    else:
        # ceil(log2(amax/qmax)) is either f - g or f - g + 1 (g = floor(log2 qmax)); decide exactly:
        # amax <= qmax * 2^(f-g) is an exact fp32 comparison (qmax has few mantissa bits).
        g = fmt.emax_elem
        low = f - g
        exponent = low + (amax > qmax * _pow2(low)).to(torch.int32)
        if rule == "round":
            # round(log2 r) = ceil - 1 when log2 r < ceil - 1/2, i.e. amax^2 < qmax^2 * 2^(2*ceil - 1).
            # amax has 24 significant bits, so amax^2 is exact in fp64 and the comparison is exact.
            a64 = amax.double()
            threshold = (qmax * qmax) * torch.ldexp(torch.ones_like(a64), (2 * exponent - 1).to(torch.int32))
            exponent = exponent - (a64 * a64 < threshold).to(torch.int32)
    return torch.clamp(exponent, E8M0_MIN_EXP, E8M0_MAX_EXP)


def e8m0_scale(amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """E8M0 scales (fp32) from group amax; NaN for non-finite amax, 1 for zero groups. Powers of two,
    except for floor43 (a power of two divided by 0.75 in fp32)."""
    finite = torch.isfinite(amax)
    positive = finite & (amax > 0)
    safe = torch.where(positive, amax, torch.ones_like(amax))
    scale = _pow2(e8m0_exponent(safe, fmt))
    if fmt.scale_rounding == "floor43":
        scale = divide(scale, FLOOR43_DIVISOR)
    scale = torch.where(positive, scale, torch.ones_like(scale))
    return torch.where(finite, scale, torch.full_like(scale, math.nan))


def nv_tensor_scale(tensor_amax: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Second-level fp32 scale of NVFP4/NVINT4: amax / (qmax * 448), so block scales fit E4M3
    (amax / (qmax * 256) with Four Over Six, so that 1.5 x the largest block code still fits)."""
    cap = FOUR_OVER_SIX_E4M3_MAX if fmt.four_over_six else E4M3_MAX
    return divide(tensor_amax.float(), fmt.qmax * cap)


E4M3_MIN_NORMAL = 2.0**-6


def e4m3_block_scale(
    amax_over_qmax: torch.Tensor, tensor_scale: torch.Tensor, expansion: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 block scales, with the numerics of torchao's NVFP4 (which match NVIDIA's kernels).

    code = e4m3(clamp((amax/qmax) / s_t, 2^-6, 448)) (RNE; the lower clamp keeps every code at least
    E4M3's smallest normal, so no block gets a zero scale); elements are quantized by multiplying
    with inv = (1/s_t)/code and dequantized by multiplying with code * s_t.
    expansion: the fp32 ratio is multiplied by it before the clamp (1.5: Four Over Six's 4-candidate).
    Returns (scale, inv_scale).
    """
    ratio = amax_over_qmax / tensor_scale
    if expansion != 1.0:
        ratio = ratio * expansion
    ratio = torch.clamp(ratio, E4M3_MIN_NORMAL, E4M3_MAX)
    code = round_to_float_element(ratio, "e4m3")
    inv_scale = (torch.ones_like(tensor_scale) / tensor_scale) / code
    return code * tensor_scale, inv_scale


def fp32_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """amax / qmax; 1 for zero groups, NaN for non-finite groups."""
    scale = torch.where(amax > 0, divide(amax, qmax), torch.ones_like(amax))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(amax, math.nan))
