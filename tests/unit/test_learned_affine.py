"""Learned affine transforms: the Kronecker / clipping primitives (harness.affine), FlatQuant and OSTQuant on
tiny models (equivalence with quantizers off, determinism, objectives that decrease, learned beats init)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from harness.affine import (
    AffineFactor,
    AffineTransforms,
    SiteTransform,
    balanced_factors,
    clipped_fake_quant,
    install_affine,
    kron_act,
)
from harness.data import calibration_windows
from harness.errors import InvalidValueError, PtqbenchError, UnknownNameError
from harness.formats import get_format, quantize
from harness.method import CalibConfig, CalibContext
from harness.models import get_adapter, make_tiny_model
from harness.quant import apply_scheme, get_scheme
from harness.registry import get_method
from harness.quant.quantizer import quantizers
from harness.rotation.install import Rotations, equivalence_error
from harness.rotation.learn import orthogonality_error
from harness.state import states_equal
from harness.transforms import kronecker, random_orthogonal

FAMILIES = ["llama", "qwen2", "qwen3_moe"]
FLAT = {"epochs": 4, "batch_size": 4, "init": "hadamard"}
OST = {"weight_solver": "rtn", "steps": 6, "batch_size": 4}


def context(family="llama", scheme="w4a4kv4", seed=0, dtype=torch.float32, n=8):
    model, tok, adapter = make_tiny_model(family, dtype=dtype)
    return CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme),
                        calib=CalibConfig(corpus="c4", n=n, seqlen=64), seed=seed)


def held_out(tok, n=4):
    return calibration_windows(tok, "c4", n, 64, seed=123)


def calibrate_and_apply(method_name, params, family="llama", calib_scheme="w4a4kv4", eval_scheme="w16a16", seed=0):
    ctx = context(family, calib_scheme, seed)
    ids = held_out(ctx.tokenizer)
    with torch.no_grad():
        ref = ctx.model(ids).logits
    method = get_method(method_name)(params)
    with torch.no_grad():  # as the runner calls it
        state = method.calibrate(ctx)
        assert torch.equal(ctx.model(ids).logits, ref), "calibrate must leave the cell's model untouched"
    out = copy.deepcopy(ctx.model)
    with torch.no_grad():
        method.apply(out, get_adapter(out), state, get_scheme(eval_scheme))
    return ref, out, ids, state, ctx


def layer_errors(fp_model, q_model, ids) -> list[float]:
    """Per decoder layer, MSE between the FP layer output and the quantized model's layer output when that
    layer is fed the FP layer input (no error propagation): the layer-wise objective, measured through
    the inference path (hooks on the real modules, independent of the methods' training code)."""
    inputs, fp_out, q_out = {}, {}, {}

    def hooks(model, record_in, store):
        handles = []
        for i, layer in enumerate(model.model.layers):
            def pre(_m, args, kwargs, i=i):
                if record_in:
                    inputs[i] = args[0] if args else kwargs["hidden_states"]
                    return None
                if args:
                    return (inputs[i], *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": inputs[i]}

            def post(_m, _args, _kwargs, out, i=i):
                store[i] = out[0] if isinstance(out, tuple) else out

            handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                        layer.register_forward_hook(post, with_kwargs=True)]
        return handles

    for model, record_in, store in ((fp_model, True, fp_out), (q_model, False, q_out)):
        handles = hooks(model, record_in, store)
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in handles:
                h.remove()
    return [float((q_out[i] - fp_out[i]).pow(2).mean()) for i in sorted(fp_out)]


# ---- primitives ---------------------------------------------------------------------------------------------


def test_balanced_factors_and_kronecker_application():
    assert balanced_factors(576) == (24, 24) and balanced_factors(1536) == (32, 48)
    assert balanced_factors(128) == (8, 16) and balanced_factors(97) == (1, 97)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(16, 16, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 128, generator=g, dtype=torch.float64)
    assert torch.allclose(kron_act(x, a, b), x @ kronecker(a, b), atol=1e-12)
    assert torch.allclose(kron_act(x, a, None), x @ kronecker(a, torch.eye(16, dtype=torch.float64)), atol=1e-12)
    assert torch.allclose(kron_act(x, None, b), x @ kronecker(torch.eye(8, dtype=torch.float64), b), atol=1e-12)


def test_affine_factor_is_invertible_with_exact_inverse_and_starts_at_its_init():
    h = random_orthogonal(12, seed=3)
    f = AffineFactor(h)
    assert torch.allclose(f.matrix(torch.float64), h, atol=1e-6)
    with torch.no_grad():
        f.k.normal_(generator=torch.Generator().manual_seed(1))
        f.m.normal_(generator=torch.Generator().manual_seed(2))
        f.log_sigma.normal_(generator=torch.Generator().manual_seed(3))
    p = f.matrix(torch.float64)
    assert not torch.allclose(p @ p.T, torch.eye(12, dtype=torch.float64), atol=1e-2)  # not orthogonal any more
    assert torch.allclose(f.inverse_t(torch.float64), torch.linalg.inv(p).T, atol=1e-10)


@pytest.mark.parametrize("fmt", ["int4", "int4_asym", "int4_g64", "mxfp4", "nvfp4"])
def test_clipped_fake_quant_equals_the_formats_clip_ratio(fmt):
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 3
    f = get_format(fmt)
    for r in (1.0, 0.8, 0.5):
        assert torch.equal(clipped_fake_quant(x, f, r), quantize(x, dataclasses.replace(f, clip_ratio=r)))
    if f.scale_type == "e4m3":
        return  # per-row reference below would use each row's own tensor scale, not the tensor's
    rows = torch.linspace(0.5, 1.0, 6)
    expected = torch.cat([quantize(x[i:i + 1], dataclasses.replace(f, clip_ratio=float(rows[i]))) for i in range(6)])
    assert torch.equal(clipped_fake_quant(x, f, rows), expected)


def test_clipped_fake_quant_gradients():
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
    ratio = torch.full((4,), 0.7, requires_grad=True)
    out = clipped_fake_quant(x, "int4", ratio)
    assert torch.equal(out.detach(), clipped_fake_quant(x.detach(), "int4", ratio.detach()))
    out.sum().backward()
    # straight-through inside the clipped range: gradient 1 for every element but the clipped ones
    amax = x.detach().abs().amax(-1, keepdim=True)
    inside = x.detach().abs() < 0.7 * amax
    assert torch.allclose(x.grad[inside], torch.ones_like(x.grad[inside]))
    assert ratio.grad is not None and torch.isfinite(ratio.grad).all() and (ratio.grad != 0).all()
    # lowering the clip where the scale gradient says so lowers a loss that prefers finer steps
    err = lambda r: float((clipped_fake_quant(x.detach(), "int4", r) - x.detach()).pow(2).sum())  # noqa: E731
    r = torch.full((4,), 0.98, requires_grad=True)
    (clipped_fake_quant(x.detach(), "int4", r) - x.detach()).pow(2).sum().backward()
    assert err((r - 0.05 * r.grad.sign()).detach()) < err(r.detach())


def test_install_affine_rejects_unknown_and_unsupported_sites():
    model, _, adapter = make_tiny_model("llama")
    with pytest.raises(UnknownNameError, match="affine transform site"):
        install_affine(model, adapter, AffineTransforms([{"attn": SiteTransform()}]))
    model, _, adapter = make_tiny_model("qwen3_moe")  # routed experts only: no dense down_proj
    with pytest.raises(InvalidValueError, match="experts_down"):
        install_affine(model, adapter, AffineTransforms([{"down": SiteTransform(torch.eye(8), torch.eye(16))}]))
    model, _, adapter = make_tiny_model("llama")
    with pytest.raises(InvalidValueError, match="dense layer"):
        install_affine(model, adapter, AffineTransforms([{"experts_down": SiteTransform(torch.eye(16), torch.eye(16))}]))


@pytest.mark.parametrize("family", FAMILIES + ["qwen2_moe"])
def test_random_affine_transforms_keep_logits(family, tmp_path):
    """Random invertible (non-orthogonal) factors and diagonals at every site: quantizers off, same logits
    (installed from the transforms as a saved and reloaded state holds them)."""
    from methods.flatquant import FlatQuantState

    model, tok, adapter = make_tiny_model(family)
    ids = held_out(tok)
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5

    def site(n, diag=True):
        n1, n2 = balanced_factors(n)
        d = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64)) if diag else None
        return SiteTransform(rand(n1), rand(n2), d)

    geo = adapter.attention
    layers = []
    for view in adapter.layers():
        sites = {"qkv": site(adapter.hidden_size), "mlp": site(adapter.hidden_size),
                 "o": SiteTransform(rand(geo.num_heads), rand(geo.head_dim))}
        if view.dense_mlp is not None:
            sites["down"] = site(view.mlp_out[0].in_features)
        if view.experts is not None:
            sites["experts_down"] = site(view.experts.intermediate_size)
        layers.append(sites)
    FlatQuantState(transforms=AffineTransforms(layers)).save(tmp_path / "state")
    back = FlatQuantState.load(tmp_path / "state").transforms
    assert set(back.layers[1]) == set(layers[1]) and torch.equal(back.layers[1]["qkv"].p1, layers[1]["qkv"].p1)
    install_affine(model, adapter, back, qk=random_orthogonal(geo.head_dim, 5))
    assert equivalence_error(ref, model, ids) <= 1e-4


# ---- FlatQuant ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_flatquant_with_quantizers_off_keeps_logits(family):
    ref, out, ids, state, ctx = calibrate_and_apply("flatquant", FLAT, family)
    assert equivalence_error(ref, out, ids) <= 1e-4
    # the check is about learned, non-orthogonal transforms with diagonals
    p1 = state.transforms.layers[0]["qkv"].p1
    assert orthogonality_error(p1) > 1e-4
    assert float((state.transforms.layers[1]["mlp"].diag - 1).abs().max()) > 1e-2
    sites = set(state.transforms.layers[0])
    assert sites == ({"qkv", "o", "mlp", "experts_down"} if family == "qwen3_moe" else {"qkv", "o", "mlp", "down"})
    n_layers, per_layer = 2, 4 * 2  # 8 windows, batch 4: 2 steps per epoch
    assert state.meta["steps"] == n_layers * per_layer
    assert any(state.weight_clips) and any(state.act_clips)


def test_flatquant_is_deterministic_per_seed():
    params = {**FLAT, "epochs": 2, "init": "random"}
    a = get_method("flatquant")(params).calibrate(context(seed=0))
    b = get_method("flatquant")(params).calibrate(context(seed=0))
    c = get_method("flatquant")(params).calibrate(context(seed=1))
    assert states_equal(a, b, meta=False)
    assert not torch.equal(a.transforms.layers[0]["qkv"].p1, c.transforms.layers[0]["qkv"].p1)


@pytest.mark.parametrize("scheme", ["w4a4kv4", "mxfp4"])
def test_flatquant_learned_transforms_beat_their_init_and_the_identity(scheme):
    """Layer output error with the scheme on, measured through the inference path on the calibration
    windows: trained transforms < their Hadamard init (same clips at init) < nothing learned at all."""
    params = {**FLAT, "epochs": 15}
    ctx = context(scheme=scheme)
    ids = ctx.calib_inputs()
    errors = {}
    for name, p in {"learned": params, "hadamard_init": {**params, "epochs": 0},
                    "identity_init": {**params, "epochs": 0, "init": "identity", "diag": False}}.items():
        method = get_method("flatquant")(p)
        with torch.no_grad():
            state = method.calibrate(ctx)
        q = copy.deepcopy(ctx.model)
        with torch.no_grad():
            method.apply(q, get_adapter(q), state, get_scheme(scheme))
        errors[name] = layer_errors(ctx.model, q, ids)
        if name == "learned":
            records = state.meta["info"]["layers"]
            # the training objective is what the inference path computes
            for rec, err in zip(records, errors[name]):
                assert err == pytest.approx(rec["mse_final"], rel=1e-3)
            assert all(r["mse_final"] < r["mse_init"] for r in records)
    for i in range(2):
        assert errors["learned"][i] < 0.97 * errors["hadamard_init"][i], errors
    assert sum(errors["learned"]) < sum(errors["identity_init"])


def test_flatquant_gptq_on_moe_and_quantized_model_runs():
    params = {**FLAT, "epochs": 1, "weight_solver": "gptq"}
    ref, out, ids, state, ctx = calibrate_and_apply("flatquant", params, "qwen3_moe", eval_scheme="w4a4kv4")
    assert any("experts" in k for k in state.weights)
    with torch.no_grad():
        logits = out(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, ref)
    # activation clips are installed as the format's clip ratio
    q = get_adapter(out).layer(0).site("q")
    assert q.act_format.clip_ratio == pytest.approx(state.act_clips[0]["qkv"], rel=1e-6)
    assert q.act_format.clip_ratio < 1.0


def test_flatquant_rejects_schemes_quantizing_lm_head():
    ctx = context(scheme="w4a4")
    ctx.scheme = dataclasses.replace(get_scheme("w4a4"), lm_head=True)
    with pytest.raises(PtqbenchError, match="lm_head"):
        get_method("flatquant")(FLAT).calibrate(ctx)


# ---- OSTQuant -------------------------------------------------------------------------------------------------


def random_scales(method, ctx, seed=1):
    _, _, scales = method.initial(ctx)
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.exp(0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)) for k, v in s.items()}
            for s in scales]


@pytest.mark.parametrize("family", FAMILIES + ["qwen2_moe"])
def test_ost_transforms_with_random_scales_keep_logits(family):
    from methods.ostquant import install_ost

    ctx = context(family)
    method = get_method("ostquant")(OST)
    r1, r2s, _ = method.initial(ctx)
    scales = random_scales(method, ctx)
    ids = held_out(ctx.tokenizer)
    with torch.no_grad():
        ref = ctx.model(ids).logits
    model = copy.deepcopy(ctx.model)
    install_ost(model, get_adapter(model), Rotations(residual=r1, heads=r2s, qk=method._qk(ctx), down_kind="hadamard"),
                scales)
    assert equivalence_error(ref, model, ids) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_ost_training_forward_is_the_quantized_inference_model(family):
    """float64 (so that no 4-bit rounding flips between the two): the training logits at given transforms
    equal the logits of the model with those transforms merged and the scheme installed."""
    from methods.ostquant import install_ost

    scheme = get_scheme({"name": "a4kv4", "activation": "int4", "kv": "int4_asym"})
    ctx = context(family, dtype=torch.float64)
    ctx.scheme = scheme
    method = get_method("ostquant")(OST)
    r1, r2s, _ = method.initial(ctx)
    scales = random_scales(method, ctx)
    ids = held_out(ctx.tokenizer, 2)
    with torch.no_grad():
        train_logits = method.training_model(ctx).logits(r1, r2s, scales, ids)
    model = copy.deepcopy(ctx.model)
    adapter = get_adapter(model)
    with torch.no_grad():
        install_ost(model, adapter, Rotations(residual=r1, heads=r2s, qk=method._qk(ctx), down_kind="hadamard"), scales)
        apply_scheme(model, adapter, scheme, quantize_weights=False)
        logits = model(ids).logits
    assert float((train_logits - logits).abs().max() / logits.abs().max()) < 1e-9


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_ost_training_quantizers_are_straight_through(family):
    """During the training forward every quantizer of the training copy that quantizes (activations,
    experts, KV) passes gradients straight through, and only then; the loss reaches R1 and the scalings."""
    ctx = context(family)
    method = get_method("ostquant")(OST)
    trainer = method.training_model(ctx)
    active = [q for q in quantizers(trainer.model) if q.fmt is not None]
    kv = [m.kv_quantizer for m in trainer.model.modules() if getattr(m, "kv_quantizer", None) is not None]
    assert kv and all(q in active for q in kv if q.fmt is not None) and len(active) > len(kv)
    seen = []
    handle = trainer.model.register_forward_pre_hook(lambda *_: seen.append([q.straight_through for q in active]))
    r1, r2s, scales = method.initial(ctx)
    r1 = r1.clone().requires_grad_(True)
    scales = [{k: v.clone().requires_grad_(True) for k, v in s.items()} for s in scales]
    ids = held_out(ctx.tokenizer, 2)
    with torch.enable_grad():
        trainer.logits(r1, r2s, scales, ids).float().pow(2).mean().backward()
    handle.remove()
    assert seen == [[True] * len(active)]
    assert not any(q.straight_through for q in active)
    assert r1.grad is not None and float(r1.grad.abs().max()) > 0
    assert float(scales[0]["attn"].grad.abs().max()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ostquant_with_quantizers_off_keeps_logits(family):
    ref, out, ids, state, ctx = calibrate_and_apply("ostquant", OST, family)
    info = state.meta["info"]
    assert info["orthogonality_error"] < 1e-10
    assert info["metrics"]["scale_max_change"] > 1e-4  # the scalings were trained
    init = get_method("ostquant")(OST).initial(ctx)
    assert not torch.allclose(state.rotations.residual, init[0], atol=1e-4)
    assert equivalence_error(ref, out, ids) <= 1e-4
    assert state.meta["steps"] == OST["steps"]


def test_ostquant_is_deterministic_per_seed():
    params = {**OST, "steps": 3}
    a = get_method("ostquant")(params).calibrate(context(seed=0))
    b = get_method("ostquant")(params).calibrate(context(seed=0))
    c = get_method("ostquant")(params).calibrate(context(seed=1))
    assert states_equal(a, b, meta=False)
    assert not torch.equal(a.rotations.residual, c.rotations.residual)


def test_kl_top_loss():
    from methods.ostquant import kl_top

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 50, generator=g)
    assert float(kl_top(t, t, 10)) == pytest.approx(0.0, abs=1e-7)
    s = t + torch.randn(2, 5, 50, generator=g)
    # k = vocabulary: the full KL, computed independently
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    full = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(kl_top(s, t, 50)) == pytest.approx(full, rel=1e-5)
    assert float(kl_top(s, t, 50, renormalize=True)) == pytest.approx(full, rel=1e-5)
    # only the teacher's top-k tokens count: a change outside them leaves the renormalised loss alone
    top = t.topk(10, -1).indices
    s2 = s.clone()
    mask = torch.ones_like(s2, dtype=torch.bool).scatter_(-1, top, False)
    s2[mask] += 5.0
    assert float(kl_top(s2, t, 10, renormalize=True)) == pytest.approx(float(kl_top(s, t, 10, renormalize=True)), rel=1e-5)


@pytest.mark.parametrize("scheme", ["w4a4kv4", "nvfp4"])
def test_ostquant_beats_its_hadamard_init_on_its_loss(scheme):
    params = {**OST, "steps": 48, "batch_size": 8}  # one fixed batch, the official learning rates
    ctx = context(scheme=scheme)
    method = get_method("ostquant")(params)
    with torch.no_grad():
        state = method.calibrate(ctx)
    ids = ctx.training_windows(method.params.samples, method.params.seqlen)
    r1, r2s, scales = method.initial(ctx)
    learned = state.rotations
    before = method.objective(ctx, r1, r2s, scales, ids)
    after = method.objective(ctx, learned.residual, learned.heads, state.scales, ids)
    assert after < 0.95 * before, (before, after)
    losses = state.meta["info"]["losses"]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_ostquant_gptq_runs_on_moe():
    ref, out, ids, state, _ = calibrate_and_apply("ostquant", {**OST, "steps": 2, "weight_solver": "gptq"},
                                                  "qwen3_moe", eval_scheme="w4a4kv4")
    assert state.weights
    with torch.no_grad():
        logits = out(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, ref)


def test_ostquant_klt_init_and_scalings_move():
    """R1 starts at KLT x Hadamard (orthogonal, first column the readers' top principal direction, up to the
    Hadamard's mixing); training moves every scaling family from 1, S_qk included."""
    from methods.ostquant import reader_klt

    ctx = context("llama")
    klt = reader_klt(ctx.adapter)
    assert orthogonality_error(klt) < 1e-10
    method = get_method("ostquant")({**OST, "steps": 4})
    r1, _, scales = method.initial(ctx)
    assert orthogonality_error(r1) < 1e-10 and not torch.allclose(r1, klt)
    assert {"attn", "mlp", "qk", "ov", "ud"} <= set(scales[0])
    with torch.no_grad():
        state = method.calibrate(ctx)
    assert state.meta["info"]["optimizer"] == "radam" and state.meta["info"]["s_qk"] == "trained"
    for layer in state.scales:
        for name, s in layer.items():
            assert float((s - 1).abs().max()) > 1e-4, name
    # a QK-normed model keeps S_qk off and says why
    qwen3 = context("qwen3")
    _, _, q3 = method.initial(qwen3)
    assert "qk" not in q3[0]
