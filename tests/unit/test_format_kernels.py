"""The Triton block-format kernels give the same bits as the torch path (interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
from test_formats import edge_blocks, wide_random

from harness.formats import get_format, quantize
from harness.formats.kernels import supports

pytest.importorskip("triton")

MX_FORMATS = ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "mxint4"]
KERNEL_FORMATS = [*MX_FORMATS, "nvfp4", "nvfp4_4o6", "nvint4"]


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


@pytest.mark.parametrize("rule", ["floor", "ceil", "round", "rceil", "floor43"])
def test_kernel_scale_rules_equal_torch(rule):
    for name in ("mxfp4", "mxint8"):
        fmt = get_format(name, scale_rounding=rule, clip_ratio=0.95)
        x = kernel_inputs(32)
        assert same_bits(quantize(x, fmt, backend="triton"), quantize(x, fmt, backend="torch"))


@pytest.mark.parametrize("fmt_name", MX_FORMATS)
def test_kernel_floor43_equal_torch(fmt_name):
    fmt = get_format(fmt_name, scale_rounding="floor43")
    x = torch.cat([kernel_inputs(32), wide_random(32 * 64, seed=9, span=126).reshape(-1, 32)])  # E8M0 clamps too
    assert same_bits(quantize(x, fmt, backend="triton"), quantize(x, fmt, backend="torch"))


def four_over_six_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = kernel_inputs(16)
    x = x[torch.isfinite(x).all(-1)]
    gaussian = torch.randn(200, 16, generator=g)
    heavy = torch.randn(200, 16, generator=g) * torch.exp(torch.randn(200, 16, generator=g))
    return torch.cat([x, gaussian, heavy, torch.round(gaussian * 2) / 2])  # the last on the 0.5-grid: many ties


@pytest.mark.parametrize("rule", ["mse", "mae", "abs_max"])
def test_kernel_four_over_six_equal_torch(rule):
    fmt = get_format("nvfp4_4o6", four_over_six=rule)
    x = four_over_six_inputs()
    for f in (fmt, fmt.with_(clip_ratio=0.9)):
        assert same_bits(quantize(x, f, backend="triton"), quantize(x, f, backend="torch"))
    # the 3e38 edge row sets the tensor scale: check the other edge rows under a normal one too
    edges = edge_blocks(16)[[0, 1, 2, 4, 5, 6]]
    assert same_bits(quantize(edges, fmt, backend="triton"), quantize(edges, fmt, backend="torch"))


def test_kernel_nv_non_finite_and_bf16():
    x = kernel_inputs(16)
    for name in ("nvfp4", "nvfp4_4o6", "nvint4"):
        assert same_bits(quantize(x, name, backend="triton"), quantize(x, name, backend="torch"))
    y = torch.randn(64, 64).to(torch.bfloat16)  # bf16 in and out; arithmetic in fp32 inside
    for name in ("mxfp4", "nvfp4", "nvfp4_4o6"):
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
    # the new options: floor43's division, and Four Over Six's fixed-order fp64 error sums (inductor must
    # not reorder or fuse them into FMAs, or a block could pick the other candidate)
    blocks = four_over_six_inputs()
    y = torch.cat([x, blocks[: len(blocks) // 8 * 8].reshape(-1, 128)])
    formats = [get_format("mxfp4", scale_rounding="floor43"), get_format("mxint8", scale_rounding="floor43")]
    formats += [get_format("nvfp4_4o6", four_over_six=rule) for rule in ("mse", "mae", "abs_max")]
    for fmt in formats:
        assert same_bits(quantize(y, fmt, backend="compiled"), quantize(y, fmt, backend="torch"))
