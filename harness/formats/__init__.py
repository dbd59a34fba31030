"""Number formats as fake-quant functions: `quantize(x, fmt)` returns x quantized and dequantized.

Groups and blocks run along the last dimension. `fmt` is a preset name or a `Format`:

    quantize(x, "mxfp4")
    quantize(x, get_format("mxfp4", scale_rounding="ceil"))
    quantize(x, "nvfp4_4o6")                                   # Four Over Six NVFP4 (adaptive 4/6 block scales)

Arithmetic is fp32; the result has the input's shape and dtype. MX/NV formats use Triton kernels
on CUDA tensors (identical bits to the torch path, see tests); everything else runs in torch.
"""
from __future__ import annotations

import functools

import torch

from harness.errors import InvalidValueError

from harness.formats.elements import round_to_float_element, round_to_int
from harness.formats.presets import PRESETS, get_format, list_formats
from harness.formats.quantize import QuantParams, compute_params, quantize_reference_torch, quantize_with_params
from harness.formats.spec import FLOAT_ELEMENTS, Format

__all__ = [
    "FLOAT_ELEMENTS",
    "Format",
    "PRESETS",
    "QuantParams",
    "compute_params",
    "get_format",
    "list_formats",
    "quantize",
    "quantize_reference_torch",
    "quantize_with_params",
    "round_to_float_element",
    "round_to_int",
]


BACKENDS = ("auto", "torch", "compiled", "triton")


@functools.lru_cache(maxsize=None)
def _compiled_quantizer(fmt: Format):
    # Inductor fuses the ~15 elementwise passes of the torch path into one loop (same bits, tested);
    # the first call per format pays a compile of a few seconds. dynamic=False: the formats share one code
    # object, and from the second format on dynamo's automatic dynamic shapes made the kernels 3-7x slower.
    compiled = torch.compile(functools.partial(quantize_reference_torch, fmt=fmt), dynamic=False)
    if fmt.scale_type != "e4m3":
        return compiled
    # Inside the compiled graph the whole-tensor amax of NVFP4/NVINT4 made the kernel ~5x slower on CPU
    # (measured: 68 ms vs 12.5 ms for 2048 x 2048, 1 thread); an eager max is exact, so the bits are the same.
    return lambda x: compiled(x, tensor_amax=x.float().abs().amax()) if x.numel() else compiled(x)


def quantize(x: torch.Tensor, fmt: str | Format, backend: str = "auto") -> torch.Tensor:
    """Fake-quantize `x` along its last dimension.

    backend: "auto" (Triton for MX/NV block formats on CUDA, else eager torch), "torch" (eager),
    "compiled" (torch.compile of the torch path: fastest on CPU for large tensors) or "triton"
    (on CPU only under TRITON_INTERPRET=1, which the tests use). All give identical bits.
    """
    fmt = get_format(fmt)
    if backend not in BACKENDS:
        raise InvalidValueError("quantize backend", backend, ", ".join(BACKENDS))
    if backend == "torch":
        return quantize_reference_torch(x, fmt)
    if backend == "compiled":
        return _compiled_quantizer(fmt)(x)
    from harness.formats import kernels

    if backend == "triton" or (x.is_cuda and kernels.supports(fmt)):
        return kernels.quantize_triton(x, fmt)
    return quantize_reference_torch(x, fmt)
