"""Equivalence self-check of every rotation method: with quantizers off, logits are unchanged."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.data import calibration_windows
from harness.method import CalibConfig, CalibContext
from harness.models import get_adapter, make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from harness.rotation.install import equivalence_error

FAMILIES = ["llama", "qwen2", "qwen3_moe", "llama_h96"]


def context(model, tok, adapter, scheme="w16a16", seed=0):
    return CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme),
                        calib=CalibConfig(corpus="c4", n=16, seqlen=64), seed=seed)


def run(method_name, family, params=None, scheme="w16a16", seed=0):
    model, tok, adapter = make_tiny_model(family)
    ids = calibration_windows(tok, "c4", 4, 64, seed=123)  # held-out windows of the calibration corpus
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method(method_name)(params or {})
    state = method.calibrate(context(model, tok, adapter, scheme, seed))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref), "calibrate must leave the cell's model untouched"
    rotated = copy.deepcopy(model)
    method.apply(rotated, get_adapter(rotated), state, get_scheme(scheme))
    return ref, rotated, ids, method


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["quarot", "brq", "torq", "perq"])
def test_rotation_with_quantizers_off_keeps_logits(method, family):
    ref, rotated, ids, _ = run(method, family, {"weight_solver": "rtn"})
    assert equivalence_error(ref, rotated, ids) <= 1e-4


def test_rotations_change_weights_and_are_seeded():
    _, a, _, _ = run("quarot", "llama", {"weight_solver": "rtn"}, seed=0)
    _, b, _, _ = run("quarot", "llama", {"weight_solver": "rtn"}, seed=0)
    _, c, _, _ = run("quarot", "llama", {"weight_solver": "rtn"}, seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_torq_givens_ablation_equalises_blocks_and_raises_entropy():
    _, rotated, _, method = run("torq", "llama_h96", {"weight_solver": "rtn", "inter": "givens", "select": "entropy"})
    m = method.metrics(rotated, None)
    assert m["residual_block_cv_after"] < 1e-6 < m["residual_block_cv_before"]
    assert m["residual_entropy_after"] >= m["residual_entropy_before"]
    assert "down_block_cv_after" in m


def test_torq_stage2_is_the_least_output_error_candidate_and_is_recorded():
    model, tok, adapter = make_tiny_model("llama_h96")
    method = get_method("torq")({"weight_solver": "rtn"})
    state = method.calibrate(context(model, tok, adapter, "mxfp4", 0))
    info = state.meta["info"]
    scores = info["residual_scores"]
    assert info["stage2_choice"]["residual"] == min(scores, key=scores.get) and "identity" in scores
    assert set(info["stage2_choice"]) == {"residual", *(f"down.{i}" for i in range(adapter.num_layers))}
    m = info["metrics"]
    assert m["residual_output_error_after"] == pytest.approx(min(scores.values()))
    assert m["residual_output_error_after"] <= scores["identity"]
    # the per-layer down_proj transform is kept as a permutation + one block: O(d_ff) per layer, not O(d_ff²)
    rot, d_ff = state.rotations, adapter.layer(0).mlp_out[0].in_features
    assert rot.down_kind == "permuted_block" and len(rot.down) == len(rot.down_perm) == adapter.num_layers
    assert all(r.shape == (32, 32) for r in rot.down)
    assert all(torch.equal(p.sort().values, torch.arange(d_ff)) for p in rot.down_perm)


def test_isolating_permutation_keeps_a_massive_channel_alone_with_the_quietest():
    """MXFP4 with one massive channel (an attention sink's): isolating it in a block of the quietest channels
    leaves the other channels' error far below the Givens equalisation, which smears it into a second block."""
    from harness.rotation.blockstats import (equalize_blocks, isolating_permutation, massive_channels,
                                             output_error, permutation_matrix)

    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.2, 2.0, 96, dtype=torch.float64)
    x = torch.randn(512, 96, generator=g, dtype=torch.float64) * scales
    x[:, 7] = 200.0 + torch.randn(512, generator=g, dtype=torch.float64)  # massive on every token
    cov, absmax = x.T @ x / 512, x.abs().amax(0)
    massive = massive_channels(absmax, 20.0)
    assert massive.tolist() == [7]
    perm = isolating_permutation(torch.diagonal(cov), massive, 32)
    assert sorted(perm.tolist()) == list(range(96))
    first = perm[:32].tolist()
    assert first[0] == 7 and set(first[1:]) == set(torch.argsort(torch.diagonal(cov))[:31].tolist())
    eye = torch.eye(96, dtype=torch.float64)
    quiet = [c for c in range(96) if c != 7]
    reader = eye[quiet]  # read every channel but the massive one
    err_isolate = output_error([(x, [reader], None)], permutation_matrix(perm))
    err_givens = output_error([(x, [reader], None)], equalize_blocks(cov, 32))
    assert err_isolate < 0.5 * err_givens


def test_rotation_plus_gptq_and_mxfp4_runs_and_improves_on_rtn():
    ref, gptq_model, ids, _ = run("brq", "llama", {"weight_solver": "gptq"}, scheme="mxfp4_w")
    _, rtn_model, _, _ = run("brq", "llama", {"weight_solver": "rtn"}, scheme="mxfp4_w")
    with torch.no_grad():
        e_gptq = float(((gptq_model(ids).logits - ref) ** 2).mean())
        e_rtn = float(((rtn_model(ids).logits - ref) ** 2).mean())
    assert 0 < e_gptq < e_rtn


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_hcast_with_quantizers_off_keeps_logits_and_changes_mxint4(family):
    ref, rotated, ids, _ = run("hcast", family)
    assert equivalence_error(ref, rotated, ids) <= 1e-4
    _, plain, _, _ = run("rtn", family, scheme="mxint4")
    _, hadamard_first, _, _ = run("hcast", family, scheme="mxint4")
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, hadamard_first(ids).logits)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_quarot_o_proj_input_sees_the_full_hadamard(family):
    """QuaRot's official o_proj input is attn_out (H_heads ⊗ H_hd): per-head R2 on V plus the online
    cross-head Hadamard; quantizers off the logits stay."""
    from harness.method import CalibConfig, CalibContext
    from harness.quant import get_scheme
    from harness.registry import get_method
    from harness.transforms import hadamard

    model, tok, adapter = make_tiny_model(family)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    handle = adapter.layer(1).o.register_forward_pre_hook(lambda m, a: seen.__setitem__("fp", a[0]))
    ref = model(ids).logits
    handle.remove()
    method = get_method("quarot")({"weight_solver": "rtn"})
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme("w16a16"),
                       calib=CalibConfig(corpus="wikitext2", n=1, seqlen=16), seed=0)
    state = method.calibrate(ctx)
    assert state.meta["info"]["o_heads"] == "hadamard"
    method.apply(model, adapter, state, get_scheme("w16a16"))
    adapter = get_adapter(model)
    transform = adapter.layer(1).site("o").input_transform  # what o_proj's quantizer reads
    handle = transform.register_forward_hook(lambda m, a, y: seen.__setitem__("rot", y))
    out = model(ids).logits
    handle.remove()
    full = torch.kron(hadamard(adapter.num_heads), hadamard(adapter.head_dim)).float()
    torch.testing.assert_close(seen["rot"], seen["fp"] @ full, rtol=1e-4, atol=1e-5)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_gptaq_solver_at_alpha_zero_equals_gptq_and_at_alpha_quarter_helps_w4a4():
    """weight_solver gptaq with α = 0 gives the gptq solver's model bit for bit (its wrappers installed
    first: other parameter names, same numbers); at α = 0.25 under W4A4 the logits move closer to FP."""
    ref, gptq_model, ids, _ = run("quarot", "llama", {"weight_solver": "gptq"}, scheme="mxfp4_w")
    _, zero_model, _, _ = run("quarot", "llama", {"weight_solver": "gptaq", "gptaq_alpha": 0.0}, scheme="mxfp4_w")
    with torch.no_grad():
        assert torch.equal(gptq_model(ids).logits, zero_model(ids).logits)
    errors = {}
    for solver in ("gptq", "gptaq"):
        _, model, _, _ = run("quarot", "llama", {"weight_solver": solver}, scheme="w4a4")
        with torch.no_grad():
            errors[solver] = float(((model(ids).logits - ref) ** 2).mean())
    assert errors["gptaq"] < errors["gptq"], errors
