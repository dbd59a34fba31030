"""SmoothQuant and AWQ on tiny models: function-preserving scale folding, determinism, cached states,
and lower quantization error than round-to-nearest where activations have outlier channels."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.data import calibration_windows
from harness.formats import quantize
from harness.method import CalibConfig, CalibContext, State
from harness.models import get_adapter, make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from harness.rotation.install import equivalence_error
from harness.state import states_equal

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # many small ops on a shared 2-core machine: one thread avoids oversubscription stalls
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


W4 = {"name": "w4_asym_g32", "weight": "int4_asym_g32"}
OUTLIERS = [3, 17, 60, 101]


def plant_outliers(model, factor: float = 20.0) -> None:
    """Make a few hidden channels of every norm output `factor` times larger and divide the readers'
    columns by it: the same function, but activations with outlier channels (as in real LLMs)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for view in adapter.layers():
            for norm, weights in ((view.attn_norm, [view.q.weight, view.k.weight, view.v.weight]),
                                  (view.mlp_norm, [lin.weight for lin in view.mlp_in]
                                   + [r.weight for r in view.router_linears]
                                   + ([view.experts.gate_up] if view.experts is not None else []))):
                norm.weight[OUTLIERS] *= factor
                for w in weights:
                    w[..., OUTLIERS] /= factor


def tiny(family: str, planted: bool = False):
    model, tok, adapter = make_tiny_model(family)
    if planted:
        plant_outliers(model)
    return model, tok, adapter


def held_out(tok):
    return calibration_windows(tok, "c4", 4, 64, seed=123)


def calibrate(method, model, tok, adapter, scheme):
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme),
                       calib=CalibConfig(corpus="c4", n=16, seqlen=64), seed=0)
    return method.calibrate(ctx)


def applied(method, model, state, scheme):
    out = copy.deepcopy(model)
    method.apply(out, get_adapter(out), state, get_scheme(scheme))
    return out


def logits_mse(model, ids, ref) -> float:
    with torch.no_grad():
        return float(((model(ids).logits - ref) ** 2).mean())


def rtn(model, scheme):
    return applied(get_method("rtn")(), model, State(), scheme)


def channel_absmax(model, ids) -> list[torch.Tensor]:
    """Per layer, max |x_j| of the q/k/v input (the attention norm output), measured with a hook."""
    seen = []

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().abs().reshape(-1, x.shape[-1]).amax(0))

    handles = [view.attn.register_forward_pre_hook(hook, with_kwargs=True) for view in get_adapter(model).layers()]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


# ---- SmoothQuant ----------------------------------------------------------------------------
@pytest.mark.parametrize("family,sites", [("llama", "norms"), ("qwen2", "norms"), ("qwen3_moe", "norms"),
                                          ("qwen3_moe", "all"), ("llama", "all")])
def test_smoothquant_with_quantizers_off_keeps_logits(family, sites):
    model, tok, adapter = tiny(family)
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("smoothquant")({"sites": sites})
    state = calibrate(method, model, tok, adapter, "w8a8")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref), "calibrate must leave the model untouched"
    n_sites = 2 if sites == "norms" else 4
    assert len(state.scales) == adapter.num_layers
    assert sum(len(layer) for layer in state.scales) == n_sites * adapter.num_layers
    smoothed = applied(method, model, state, "w16a16")
    assert equivalence_error(ref, smoothed, ids) <= 1e-4
    # the weights did change: the norm now absorbs 1/s
    assert not torch.equal(smoothed.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_smoothquant_is_deterministic_and_follows_the_formula():
    model, tok, adapter = tiny("llama")
    method = get_method("smoothquant")({"alpha": 0.5})
    a = calibrate(method, model, tok, adapter, "w8a8")
    b = calibrate(method, model, tok, adapter, "w8a8")
    assert [layer.keys() for layer in a.scales] == [layer.keys() for layer in b.scales]
    assert states_equal(a, b)  # same structure, every scale bit for bit
    # s = sqrt(max|X| / max|W|) for the q/k/v input of layer 0, recomputed from a hook and the weights
    calib = calibration_windows(tok, "c4", 16, 64, seed=0)
    act = channel_absmax(model, calib)[0]  # one forward of all 16 windows
    view = adapter.layer(0)
    w = torch.cat([view.q.weight, view.k.weight, view.v.weight]).abs().amax(0)
    expected = (act.clamp_min(1e-5) ** 0.5 / w.clamp_min(1e-5) ** 0.5)
    torch.testing.assert_close(a.scales[0]["qkv"], expected, rtol=1e-5, atol=0)


def test_smoothquant_reduces_activation_disparity():
    model, tok, adapter = tiny("llama", planted=True)
    method = get_method("smoothquant")({})
    state = calibrate(method, model, tok, adapter, "w8a8")
    smoothed = applied(method, model, state, "w16a16")
    ids = held_out(tok)

    def disparity(a):
        return float(a.max() / a.mean())

    before = [disparity(a) for a in channel_absmax(model, ids)]
    after = [disparity(a) for a in channel_absmax(smoothed, ids)]
    assert all(b > 5 for b in before), before  # the planted outliers dominate
    assert all(x < 0.5 * b for x, b in zip(after, before)), (before, after)
    m = method.metrics(smoothed, None)
    assert m["act_disparity_after"] < m["act_disparity_before"]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_smoothquant_w8a8_beats_rtn_with_outlier_channels(family):
    model, tok, adapter = tiny(family, planted=True)
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("smoothquant")({})
    state = calibrate(method, model, tok, adapter, "w8a8")
    for scheme in ("w8a8", {"name": "w8a8_tensor", "weight": "int8", "activation": "int8_tensor"}):
        e_sq = logits_mse(applied(method, model, state, scheme), ids, ref)
        e_rtn = logits_mse(rtn(model, scheme), ids, ref)
        assert 0 < e_sq < 0.5 * e_rtn, (scheme, e_sq, e_rtn)


# ---- AWQ ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe"])
def test_awq_scaling_with_quantizers_off_keeps_logits(family):
    model, tok, adapter = tiny(family, planted=True)
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("awq")({"clip": False})
    state = calibrate(method, model, tok, adapter, W4)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref), "calibrate must leave the model untouched"
    # qkv, o, mlp_in and down (MoE: experts_down) in every layer, no clip values
    assert [sorted(layer) for layer in state.scales] == [sorted(state.scales[0])] * adapter.num_layers
    assert sum(len(layer) for layer in state.scales) == 4 * adapter.num_layers
    assert not any(state.clips)
    scaled = applied(method, model, state, "w16a16")
    assert equivalence_error(ref, scaled, ids) <= 1e-4
    # the search chose real scales somewhere (alpha = 0 would be no scaling at all)
    assert any(not torch.allclose(v, torch.ones_like(v)) for layer in state.scales for v in layer.values())


def test_awq_alpha_zero_without_clip_is_rtn():
    model, tok, adapter = tiny("llama")
    method = get_method("awq")({"n_grid": 1, "clip": False})  # the grid is {0}: s = 1 everywhere
    state = calibrate(method, model, tok, adapter, W4)
    a, b = applied(method, model, state, W4), rtn(model, W4)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_awq_beats_rtn_on_layer_output_and_logits(family):
    model, tok, adapter = tiny(family, planted=True)
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("awq")({})
    state = calibrate(method, model, tok, adapter, W4)
    awq_model, rtn_model = applied(method, model, state, W4), rtn(model, W4)

    # decoder layer 0 on the FP model's layer-0 inputs (held-out tokens)
    captured = {}

    def grab(_m, args, kwargs):
        captured["x"], captured["kw"] = (args[0] if args else kwargs["hidden_states"]), dict(kwargs)

    h = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    kw = {k: v for k, v in captured["kw"].items() if k != "hidden_states"}

    def layer_err(m):
        with torch.no_grad():
            out = m.model.layers[0](captured["x"], **kw)
            fp = model.model.layers[0](captured["x"], **kw)
        out, fp = (o[0] if isinstance(o, tuple) else o for o in (out, fp))
        return float(((out - fp) ** 2).mean())

    assert 0 < layer_err(awq_model) < 0.8 * layer_err(rtn_model)
    assert 0 < logits_mse(awq_model, ids, ref) < 0.8 * logits_mse(rtn_model, ids, ref)


def test_awq_on_a_plain_tiny_model_also_beats_rtn():
    model, tok, adapter = tiny("llama")
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    method = get_method("awq")({})
    state = calibrate(method, model, tok, adapter, W4)
    assert logits_mse(applied(method, model, state, W4), ids, ref) < logits_mse(rtn(model, W4), ids, ref)


def test_awq_is_deterministic_and_the_saved_state_reproduces_the_model(tmp_path):
    model, tok, adapter = tiny("qwen3_moe", planted=True)
    method = get_method("awq")({})
    a = calibrate(method, model, tok, adapter, W4)
    b = calibrate(method, model, tok, adapter, W4)
    assert [layer.keys() for layer in a.scales] == [layer.keys() for layer in b.scales]
    assert [layer.keys() for layer in a.clips] == [layer.keys() for layer in b.clips]
    assert a.meta["alphas"] == b.meta["alphas"]
    assert states_equal(a, b, meta=False)  # every scale and clip value bit for bit
    assert any(name.startswith("experts.") for layer in a.clips for name in layer)
    assert a.meta["steps"] > 0
    a.save(tmp_path / "state")
    loaded = get_method("awq").state_type.load(tmp_path / "state")
    assert states_equal(loaded, a)
    fresh, _, _ = tiny("qwen3_moe", planted=True)
    x, y = applied(method, model, a, W4), applied(get_method("awq")({}), fresh, loaded, W4)
    for (name, p), (_, q) in zip(x.named_parameters(), y.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("tokens", [300, 20])  # per-group Gram matrices (g < tokens) or direct products
def test_clip_search_picks_the_best_ratio_per_group(tokens):
    from methods.awq import clamp_weight, clip_search

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    x = torch.randn(tokens, 64, generator=g)
    fmt = "int3_asym_g32"
    best, e_noclip, e_best = clip_search(w, x, fmt, n_grid=20, max_shrink=0.5, n_tokens=512)
    assert best.shape == (8, 2) and e_best < e_noclip  # Gaussian weights at 3 bits: clipping pays off

    # brute force, group by group, every ratio on the same grid
    def group_err(wq, r, grp):
        cols = slice(grp * 32, (grp + 1) * 32)
        return float(((x[:, cols] @ (wq[r, cols] - w[r, cols])) ** 2).mean())

    for r in range(8):
        for grp in range(2):
            errs = {}
            for i in range(10):
                m = w[:, grp * 32:(grp + 1) * 32].abs().amax(-1) * (1 - i / 20)
                full = torch.full((8, 2), float("inf"))
                full[:, grp] = m
                wq = quantize(clamp_weight(w, full), fmt)
                errs[float(m[r])] = group_err(wq, r, grp)
            chosen = float(best[r, grp])
            assert errs[min(errs, key=errs.get)] == pytest.approx(errs[chosen], rel=1e-5, abs=1e-9)


def test_smoothquant_static_scales_are_the_calibrated_max_and_saturate():
    """O3: every linear input quantized with a fixed per-tensor scale = the largest |x / s| seen in
    calibration; a dynamic format or an MoE model is refused in one line."""
    import copy

    from harness.errors import InvalidValueError, UnsupportedModelError
    from harness.method import CalibConfig, CalibContext
    from harness.models import get_adapter, make_tiny_model
    from harness.quant import get_scheme
    from harness.quant.static import StaticQuantizer
    from harness.registry import get_method

    o3 = get_scheme({"name": "o3", "weight": "int8_tensor", "activation": "int8_tensor"})
    model, tok, adapter = make_tiny_model("llama")
    method = get_method("smoothquant")({"static_activations": True, "alpha": 0.85})
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=o3,
                       calib=CalibConfig(corpus="wikitext2", n=4, seqlen=32), seed=0)
    state = method.calibrate(ctx)
    assert set(state.static_amax[0]) == {"qkv", "o", "mlp_in", "down"}
    # the recorded max is the largest |input| the smoothed model's q_proj sees on the calibration windows
    smoothed = copy.deepcopy(model)
    method.apply(smoothed, get_adapter(smoothed), state, get_scheme("w16a16"))  # smoothing only, FP
    seen = []
    view = get_adapter(smoothed).layer(1)
    handle = view.site("q").register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        smoothed(ctx.calib_inputs())
    handle.remove()
    assert float(state.static_amax[1]["qkv"]) == pytest.approx(float(max(seen)), rel=1e-5)
    quantized = copy.deepcopy(model)
    method.apply(quantized, get_adapter(quantized), state, o3)
    q = get_adapter(quantized).layer(1).site("q").act_quantizer
    assert isinstance(q, StaticQuantizer) and q is get_adapter(quantized).layer(1).site("k").act_quantizer
    big = torch.full((1, 4, 128), 10.0 * q.amax)
    assert float(q(big).abs().max()) == pytest.approx(q.amax, rel=1e-6)  # saturates at the static max
    with pytest.raises(InvalidValueError, match="symmetric per-tensor"):
        method.calibrate(CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme("w8a8"),
                                      calib=CalibConfig(corpus="wikitext2", n=4, seqlen=32), seed=0))
    moe, mtok, madapter = make_tiny_model("qwen3_moe")
    with pytest.raises(UnsupportedModelError):
        method.calibrate(CalibContext(model=moe, tokenizer=mtok, adapter=madapter, scheme=o3,
                                      calib=CalibConfig(corpus="wikitext2", n=4, seqlen=32), seed=0))
