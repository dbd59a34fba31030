"""Static activation quantization: a per-tensor scale fixed offline from calibration (SmoothQuant's O3).

A dynamic quantizer computes each tensor's scale from that tensor; a static one uses the scale of the
largest |x| seen on the calibration data and saturates beyond it, as a deployed INT8 kernel with a
pre-computed scale does. Only symmetric per-tensor formats (int8_tensor) have a single static scale.
(Not imported by the engine: only the methods that calibrate static scales use it.)
"""
from __future__ import annotations

import torch

from harness.errors import InvalidValueError
from harness.formats import Format, compute_params, quantize_with_params
from harness.quant.quantizer import Quantizer


def check_static_format(fmt: Format | None) -> None:
    """One line when `fmt` cannot take a static scale."""
    if fmt is None or fmt.granularity != "tensor" or not fmt.symmetric:
        raise InvalidValueError("activation format for static scales", getattr(fmt, "name", fmt),
                                "a symmetric per-tensor format such as int8_tensor")


class StaticQuantizer(Quantizer):
    """x -> fake-quantized with the fixed scale of `amax` (values beyond it saturate)."""

    def __init__(self, fmt: Format, amax: float):
        check_static_format(fmt)
        super().__init__(fmt)
        self.amax = float(amax)
        self.params = compute_params(torch.tensor([[self.amax]], dtype=torch.float32), fmt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.params.scale.to(x.device)
        return quantize_with_params(x, type(self.params)(scale), self.fmt).to(x.dtype)

    def __repr__(self) -> str:
        return f"StaticQuantizer({self.fmt.name}, amax={self.amax:.4g})"
