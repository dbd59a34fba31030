"""Triton kernels for block-format fake quantization (GPU speed; bit-identical to the torch path).

On CPU they run only under the Triton interpreter (TRITON_INTERPRET=1), which the tests use.
"""
from __future__ import annotations

import os

import torch

from harness.errors import PtqbenchError
from harness.formats.scales import nv_tensor_scale
from harness.formats.spec import Format

ROWS_PER_PROGRAM = 64
_RULES = {"floor": 0, "ceil": 1, "round": 2, "rceil": 3, "floor43": 4}
_FOUR_OVER_SIX = {None: 0, "mse": 1, "mae": 2, "abs_max": 3}


def supports(fmt: Format) -> bool:
    """Block formats with power-of-two block sizes (MX and NV families)."""
    return (
        fmt.scale_type in ("e8m0", "e4m3")
        and fmt.symmetric
        and fmt.group_size is not None
        and fmt.group_size & (fmt.group_size - 1) == 0
    )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_triton(x: torch.Tensor, fmt: Format, rows_per_program: int = ROWS_PER_PROGRAM) -> torch.Tensor:
    """Fake-quantize with the Triton kernel (same result as quantize_reference_torch)."""
    if not supports(fmt):
        raise PtqbenchError(f"no Triton kernel for format {fmt.name!r}; kernels cover MX and NV block formats")
    from harness.formats.kernels.mx_nv import block_fake_quant_kernel
    from harness.formats.quantize import _as_groups

    if x.numel() == 0:
        return x.clone()
    blocks = _as_groups(x, fmt).reshape(-1, fmt.group_size).contiguous()
    # The Triton interpreter does not round fp32 -> bf16/fp16 stores to nearest even; there the
    # kernel writes fp32 and torch casts (on GPUs the store itself rounds correctly).
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    out = torch.empty_like(blocks, dtype=torch.float32 if interpreted else blocks.dtype)
    if fmt.scale_type == "e4m3":  # (with Four Over Six nv_tensor_scale caps the codes at 256)
        tensor_scale = nv_tensor_scale(blocks.float().abs().amax(), fmt)
        tensor_scale = torch.where(tensor_scale == 0, torch.ones_like(tensor_scale), tensor_scale)
    else:
        tensor_scale = torch.ones((), dtype=torch.float32, device=x.device)
    tensor_scale = tensor_scale.reshape(1).contiguous()
    element = fmt.float_element
    n_blocks = blocks.shape[0]
    grid = (triton.cdiv(n_blocks, rows_per_program),)
    block_fake_quant_kernel[grid](
        blocks,
        out,
        tensor_scale,
        n_blocks,
        BLOCK=fmt.group_size,
        ROWS=rows_per_program,
        IS_INT=element is None,
        MBITS=element.mbits if element else 0,
        EMIN=element.min_exponent if element else 0,
        QMAX=fmt.qmax,
        EMAX_ELEM=fmt.emax_elem,
        CLIP=fmt.clip_ratio,
        SCALE_KIND=0 if fmt.scale_type == "e8m0" else 1,
        RULE=_RULES[fmt.scale_rounding],
        FOUR_OVER_SIX=_FOUR_OVER_SIX[fmt.four_over_six],
        enable_fp_fusion=False,  # no FMA contraction: Four Over Six's error sums must round as in torch
    )
    return out.reshape(x.shape).to(x.dtype)


try:  # triton is optional at import time (e.g. macOS); quantize_triton then fails clearly
    import triton
except ImportError:  # pragma: no cover
    triton = None
