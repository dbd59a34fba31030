"""WUSH: an exact non-orthogonal blockwise transform per linear, lowering the W+A block-format error."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.data import calibration_windows
from harness.models import get_adapter, make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from harness.rotation.install import equivalence_error
from methods.wush import output_error, transform_inputs, transform_weight, transformed_hessian, wush_transforms
from tests.unit.test_rotation_methods import context


def test_transform_pair_is_exact_and_the_hessian_follows_it():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g, dtype=torch.float64)
    x = torch.randn(200, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 64, dtype=torch.float64)
    h = x.T @ x / 200
    t = wush_transforms(w, h, 32)
    assert t.shape == (2, 32, 32)
    torch.testing.assert_close(transform_inputs(x, t) @ transform_weight(w, t).T, x @ w.T)
    xt = transform_inputs(x, t)
    torch.testing.assert_close(transformed_hessian(h, t), xt.T @ xt / 200)


def test_white_inputs_and_isotropic_weights_give_a_scaled_orthogonal_transform():
    """With H = I and the block's whitened weights isotropic, WUSH reduces to a scaled orthogonal matrix
    (the Hadamard up to the SVD's basis): nothing to adapt to."""
    w = torch.eye(32, dtype=torch.float64).repeat(1, 2) * 3.0  # [32, 64]: every block's weights = 3 I
    t = wush_transforms(w, torch.eye(64, dtype=torch.float64), 32)[0]
    gram = t @ t.T
    torch.testing.assert_close(gram, gram[0, 0] * torch.eye(32, dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_wush_with_quantizers_off_keeps_logits(family):
    model, tok, adapter = make_tiny_model(family)
    ids = calibration_windows(tok, "c4", 2, 32, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("wush")({})
    state = method.calibrate(context(model, tok, adapter, "w16a16", 0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    work = copy.deepcopy(model)
    method.apply(work, get_adapter(work), state, get_scheme("w16a16"))
    with torch.no_grad():
        assert equivalence_error(ref, work, ids) <= 1e-4


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("inputs", ["anisotropic", "outliers"])
def test_wush_lowers_the_block_format_output_error_below_hadamard_and_identity(fmt, inputs):
    """The paper's per-layer check on planted activations: channel scales spread over two decades, or four
    outlier channels x20; W+A in the same block format, RTN."""
    from harness.formats import get_format

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g, dtype=torch.float64)
    if inputs == "anisotropic":
        x = x * torch.logspace(-1, 1, 256, dtype=torch.float64)[torch.randperm(256, generator=g)]
    else:
        x[:, torch.randperm(256, generator=g)[:4]] *= 20
    w = torch.randn(128, 256, generator=g, dtype=torch.float64)
    f = get_format(fmt)
    err = {kind: output_error(x.float(), w.float(), wush_transforms(w, x.T @ x / 2048, f.group_size, kind), f, f)
           for kind in ("identity", "hadamard", "wush")}
    assert err["wush"] < 0.7 * min(err["hadamard"], err["identity"])


@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_wush_records_the_output_error_of_each_transform_in_the_format_block(scheme):
    model, tok, adapter = make_tiny_model("llama")
    state = get_method("wush")({}).calibrate(context(model, tok, adapter, scheme, 0))
    m = state.meta["metrics"]
    assert state.meta["block"] == (32 if scheme == "mxfp4" else 16)
    assert set(m) == {"output_error_identity", "output_error_hadamard", "output_error_wush"}
    assert all(0 < v < 1 for v in m.values())


def test_wush_gptq_weights_are_stored_and_beat_its_rtn():
    model, tok, adapter = make_tiny_model("llama")
    ids = calibration_windows(tok, "c4", 4, 64, seed=123)
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for solver in ("rtn", "gptq"):
        method = get_method("wush")({"weight_solver": solver})
        state = method.calibrate(context(model, tok, adapter, "mxfp4_w", 0))
        assert all((site.weight is not None) == (solver == "gptq") for s in state.layers for site in s.values())
        work = copy.deepcopy(model)
        method.apply(work, get_adapter(work), state, get_scheme("mxfp4_w"))
        errors[solver] = equivalence_error(ref, work, ids)
    assert errors["gptq"] < errors["rtn"]


def test_output_error_is_zero_without_quantizers():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 32, generator=g), torch.randn(16, 32, generator=g)
    t = wush_transforms(w, (x.T @ x).double() / 16, 32)
    assert output_error(x, w, t, None, None) < 1e-10
