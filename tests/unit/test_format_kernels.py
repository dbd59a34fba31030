"""The Triton block-format kernels give the same bits as the torch path (interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
from test_formats import edge_blocks, wide_random

from harness.formats import get_format, quantize
from harness.formats.kernels import supports

pytest.importorskip("triton")

KERNEL_FORMATS = ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "mxint4", "nvfp4", "nvint4"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bit patterns, except that every NaN counts as the same NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    ia, ib = a.float().view(torch.int32), b.float().view(torch.int32)
    return bool(torch.all((ia == ib) | both_nan))


def kernel_inputs(block: int) -> torch.Tensor:
    x = wide_random(block * 256, seed=block, span=20).reshape(-1, block)
    x[::5] = torch.round(x[::5] * 8) / 8  # many exact ties
    edges = edge_blocks(block)
    nonfinite = torch.randn(3, block)
    nonfinite[0, 1], nonfinite[1, 2], nonfinite[2, 3] = float("nan"), float("inf"), -float("inf")
    return torch.cat([x, edges, nonfinite])


@pytest.mark.parametrize("fmt_name", KERNEL_FORMATS)
def test_kernel_bits_equal_torch(fmt_name):
    fmt = get_format(fmt_name)
    assert supports(fmt)
    x = kernel_inputs(fmt.group_size)
    if fmt.scale_type == "e4m3":
        x = x[torch.isfinite(x).all(-1)]  # one Inf would make the whole NV tensor NaN; tested below
    assert same_bits(quantize(x, fmt, backend="triton"), quantize(x, fmt, backend="torch"))


@pytest.mark.parametrize("rule", ["floor", "ceil", "round", "rceil"])
def test_kernel_scale_rules_equal_torch(rule):
    for name in ("mxfp4", "mxint8"):
        fmt = get_format(name, scale_rounding=rule, clip_ratio=0.95)
        x = kernel_inputs(32)
        assert same_bits(quantize(x, fmt, backend="triton"), quantize(x, fmt, backend="torch"))


def test_kernel_nv_non_finite_and_bf16():
    x = kernel_inputs(16)
    for name in ("nvfp4", "nvint4"):
        assert same_bits(quantize(x, name, backend="triton"), quantize(x, name, backend="torch"))
    y = torch.randn(64, 64).to(torch.bfloat16)  # bf16 in and out; arithmetic in fp32 inside
    for name in ("mxfp4", "nvfp4"):
        got, want = quantize(y, name, backend="triton"), quantize(y, name, backend="torch")
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_kernel_handles_leading_dims_and_partial_tiles():
    x = torch.randn(3, 5, 96)  # 45 rows x 3 blocks: not a multiple of the rows per program
    got = quantize(x, "mxfp4", backend="triton")
    assert got.shape == x.shape and same_bits(got, quantize(x, "mxfp4", backend="torch"))


def test_compiled_backend_bits_equal_eager():
    x = torch.cat([kernel_inputs(32)[:256].reshape(-1, 128), torch.randn(8, 128)])
    x = x[torch.isfinite(x).all(-1)]
    for name in ("mxfp4", "nvfp4", "nvint4", "int4_asym_g128"):  # NV formats: per-tensor amax taken eagerly
        assert same_bits(quantize(x, name, backend="compiled"), quantize(x, name, backend="torch"))
