"""Cross-check against a third-party implementation: torchao's MX and NVFP4 emulation."""
from __future__ import annotations

import pytest
import torch
from test_formats import wide_random

from harness.formats import get_format, quantize

mx_formats = pytest.importorskip("torchao.prototype.mx_formats")
from torchao.prototype.mx_formats import constants  # noqa: E402
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402

TORCHAO_ELEMENTS = {
    "mxfp4": torch.float4_e2m1fn_x2,
    "mxfp6_e2m3": constants.DTYPE_FP6_E2M3,
    "mxfp6_e3m2": constants.DTYPE_FP6_E3M2,
    "mxfp8_e4m3": torch.float8_e4m3fn,
    "mxfp8_e5m2": torch.float8_e5m2,
}
# our rule -> torchao's mode with the same definition
RULE_TO_TORCHAO = {"floor": ScaleCalculationMode.FLOOR, "ceil": ScaleCalculationMode.RCEIL}


def sample(rows: int, width: int, seed: int) -> torch.Tensor:
    x = wide_random(rows * width, seed=seed, span=14).reshape(rows, width)
    x[::9] = torch.round(x[::9] * 4) / 4
    return x


@pytest.mark.parametrize("rule", sorted(RULE_TO_TORCHAO))
@pytest.mark.parametrize("fmt_name", sorted(TORCHAO_ELEMENTS))
def test_mx_equals_torchao(fmt_name, rule):
    x = sample(800, 128, seed=21)  # 102,400 values
    theirs = MXTensor.to_mx(x, TORCHAO_ELEMENTS[fmt_name], 32, scaling_mode=RULE_TO_TORCHAO[rule])
    ours = quantize(x, get_format(fmt_name, scale_rounding=rule))
    torch.testing.assert_close(ours, theirs.dequantize(torch.float32), rtol=0, atol=0)


def test_nvfp4_equals_torchao_two_level():
    x = sample(1600, 64, seed=22)
    theirs = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    torch.testing.assert_close(quantize(x, "nvfp4"), theirs.dequantize(torch.float32), rtol=0, atol=0)
