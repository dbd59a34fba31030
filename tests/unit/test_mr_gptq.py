"""MR-GPTQ: the FP-Quant MSE observer and the ladder (micro-rotation, observer, act-order GPTQ) on a tiny model."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.data import calibration_windows
from harness.formats import get_format, quantize
from harness.gptq import FPQUANT_SHRINKS, MSE_NORM, clip_searched_rtn
from harness.models import get_adapter, make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from harness.rotation.install import equivalence_error
from harness.transforms import hadamard
from tests.unit.test_rotation_methods import context


def test_fpquant_observer_grid_is_the_official_one():
    assert len(FPQUANT_SHRINKS) == 100 and FPQUANT_SHRINKS[0] == 1.0
    assert FPQUANT_SHRINKS[-1] == pytest.approx(0.208)


@pytest.mark.parametrize("fmt_name, rule", [("mxfp4", "floor"), ("mxfp4", "ceil"), ("nvfp4", None),
                                            ("int4_g128", None)])
def test_mse_observer_never_loses_to_absmax_per_group_and_shrinks_some(fmt_name, rule):
    fmt = get_format(fmt_name, **({"scale_rounding": rule} if rule else {}))
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.rand(256) * 3
    plain, searched = quantize(w, fmt), clip_searched_rtn(w, fmt, shrinks=FPQUANT_SHRINKS)
    group = fmt.group_size

    def err(q):
        return (q - w).abs().pow(MSE_NORM).reshape(64, -1, group).sum(-1)

    assert bool((err(searched) <= err(plain) * (1 + 1e-6)).all())
    if rule == "floor":  # OCP floor already saturates the block max: a smaller power of two only clips more
        assert torch.equal(searched, plain)
    else:
        assert float(err(searched).sum()) < float(err(plain).sum())


def run(params, scheme):
    model, tok, adapter = make_tiny_model("llama")
    ids = calibration_windows(tok, "c4", 4, 64, seed=123)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("mr_gptq")(params)
    state = method.calibrate(context(model, tok, adapter, scheme, 0))
    work = copy.deepcopy(model)
    method.apply(work, get_adapter(work), state, get_scheme(scheme))
    return equivalence_error(ref, work, ids), state


def test_micro_rotation_is_the_format_block_hadamard_per_site():
    _, state = run({"weight_solver": "rtn", "observer": "minmax"}, "nvfp4")
    assert state.meta["block"] == 16
    for sites in state.layers:
        assert set(sites) == {"q", "k", "v", "o", "gate", "up", "down"}
        for site in sites.values():
            assert torch.allclose(site.transform, hadamard(16).expand_as(site.transform))


def test_full_recipe_beats_rtn_and_plain_gptq_on_mxfp4_weights():
    """MXFP4 weights on tiny llama: the full recipe < GPTQ without the micro-rotation < RTN (logit error)."""
    rtn, _ = run({"transform": "identity", "weight_solver": "rtn", "observer": "minmax"}, "mxfp4_w")
    gptq, _ = run({"transform": "identity", "observer": "minmax", "act_order": False, "static_groups": False}, "mxfp4_w")
    full, state = run({}, "mxfp4_w")
    assert all(site.weight is not None for sites in state.layers for site in sites.values())
    assert full < gptq < rtn, (full, gptq, rtn)


@pytest.mark.parametrize("fmt_name", ["mxfp4", "nvfp4", "int4_g128", "int4_asym_g128", "nvfp4_4o6"])
def test_pruned_scale_search_equals_scoring_every_shrink(fmt_name):
    """The search scores only the groups whose params moved; scoring every group at every shrink (naively,
    here) must choose the same params."""
    from harness.formats import compute_params, quantize_with_params
    from harness.formats import QuantParams
    from harness.gptq import _params

    fmt = get_format(fmt_name)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)) * torch.rand(256) * 3
    x = w.reshape(-1, fmt.group_size)
    amax = w.abs().amax() if fmt.scale_type == "e4m3" else None
    best_p = compute_params(x, fmt, amax)
    best = (quantize_with_params(x, best_p, fmt) - x).abs().pow(MSE_NORM).sum(-1, keepdim=True)
    for shrink in FPQUANT_SHRINKS[1:]:
        p = compute_params(x, fmt.with_(clip_ratio=shrink), amax)
        err = (quantize_with_params(x, p, fmt) - x).abs().pow(MSE_NORM).sum(-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_p = QuantParams(*(None if a is None else torch.where(better, b, a)
                               for a, b in ((best_p.scale, p.scale), (best_p.zero, p.zero),
                                            (best_p.inv_scale, p.inv_scale))))
    got = _params(x, fmt, amax, True, FPQUANT_SHRINKS)
    for a, b in ((got.scale, best_p.scale), (got.zero, best_p.zero), (got.inv_scale, best_p.inv_scale)):
        assert (a is None and b is None) or torch.equal(a, b)
