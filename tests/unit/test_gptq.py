"""GPTQ solver and layer-wise driver.

The solver is checked against an independent, naive fp64 implementation of the same greedy algorithm
(explicit inverse Hessian downdated column by column, no Cholesky, no lazy blocks), against RTN on
correlated data, and for grid membership with the params it reports having used.
"""
from __future__ import annotations

import copy
import warnings

import pytest
from types import SimpleNamespace

import torch
from torch import nn

from harness.errors import InvalidValueError
from harness.formats import compute_params, get_format, quantize, quantize_with_params
from harness.gptq import GPTQError, Hessian, _hessian_hooks, _params, gptq_quantize_model, gptq_quantize_weight
from harness.models import get_adapter
from harness.models.tiny import tiny_tokenizer
from harness.quant.layers import QuantLinear

@pytest.fixture(autouse=True)
def one_thread():
    """The solver is a chain of small ops: one thread is faster than contended OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FORMATS = ["int4", "int4_g128", "int4_asym_g128", "int3_g64", "mxfp4", "nvfp4", "mxint4"]


def correlated_problem(out=48, d=256, n=2048, seed=0):
    """Inputs with a non-identity covariance (mixed and unevenly scaled features) and a random W."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix * (1 + 4 * torch.rand(d, generator=g))
    w = torch.randn(out, d, generator=g)
    h = 2 * x.T @ x / n
    return w, x, h


def output_error(w, q, x):
    return float(((x @ w.T - x @ q.T) ** 2).sum())


def naive_gptq(w, h, fmt, damp=0.01, act_order=False, static_groups=False):
    """Greedy GPTQ written the slow way in fp64 (OBQ-style downdates of H⁻¹, every column updated at once)."""
    fmt = get_format(fmt)
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    amax = w.abs().amax().float()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    g = fmt.group_size
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order else range(cols)
    if g is None:
        fixed = compute_params(w.float(), fmt, amax)
    elif act_order or static_groups:
        static = [compute_params(w[:, s:s + g].float(), fmt, amax) for s in range(0, cols, g)]
    q = torch.zeros_like(w)
    for j in order:
        if g is None:
            p = fixed
        elif act_order or static_groups:
            p = static[j // g]
        elif j % g == 0:
            p = current = compute_params(w[:, j:j + g].float(), fmt, amax)
        else:
            p = current
        qj = quantize_with_params(w[:, j:j + 1].float(), p, fmt)[:, 0].double()
        err = (w[:, j] - qj) / hinv[j, j]
        w -= err[:, None] * hinv[j][None, :]  # row j of the downdated H⁻¹ is zero on finished columns
        q[:, j] = qj
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return q.float()


# ---- solver --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4", "int4_g128", "int4_asym_g128", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [48, 256])  # 128 (default) is used everywhere else
def test_solver_matches_naive_fp64_gptq(fmt, act_order, block_size):
    w, _, h = correlated_problem(d=256, out=16)
    h[7, :] = 0  # one dead column
    h[:, 7] = 0
    ref = naive_gptq(w, h, fmt, act_order=act_order)
    q, _ = gptq_quantize_weight(w, h, fmt, act_order=act_order, block_size=block_size)
    # fp32 vs fp64: fp32 group scales differ in the last bits, so values agree to ~1e-6, not bit for bit
    assert torch.allclose(q, ref, rtol=1e-5, atol=0), float((q - ref).abs().max())


def test_static_groups_match_naive_static_variant():
    w, _, h = correlated_problem(seed=3, out=16)
    ref = naive_gptq(w, h, "int4_g128", static_groups=True)
    q, info = gptq_quantize_weight(w, h, "int4_g128", static_groups=True)
    assert torch.allclose(q, ref, rtol=1e-5, atol=0)
    dynamic, _ = gptq_quantize_weight(w, h, "int4_g128")
    assert not torch.allclose(q, dynamic)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(fmt, act_order):
    w, x, h = correlated_problem()
    q, info = gptq_quantize_weight(w, h, fmt, act_order=act_order)
    rtn = quantize(w, fmt)
    assert output_error(w, q, x) < 0.8 * output_error(w, rtn, x)
    assert info.error > 0 and info.seconds > 0 and q.shape == w.shape and q.dtype == w.dtype


@pytest.mark.parametrize("fmt", ["int4", "int4_g128", "int4_asym_g128", "mxfp4", "nvfp4", "int4_tensor"])
@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"mse_clip": True}, {"static_groups": True}])
def test_every_element_is_on_the_grid_of_the_reported_params(fmt, options):
    w, _, h = correlated_problem(seed=1, out=32)
    q, info = gptq_quantize_weight(w, h, fmt, **options)
    f = get_format(fmt)
    g = info.group_size or w.shape[1]
    assert info.group_size == f.group_size and len(info.params) == w.shape[1] // g
    for k, params in enumerate(info.params):
        block = q[:, k * g:(k + 1) * g]
        assert torch.equal(quantize_with_params(block, params, f), block), k
    # and the codes are few: at most the format's levels per group (sym INT and FP4: ±0 merged, 15)
    levels = 2**f.bits - (1 if f.symmetric else 0)
    groups = q.reshape(q.shape[0], -1, g)
    assert 2 < max(int(grp.unique().numel()) for row in groups for grp in row) <= levels


def test_dynamic_group_params_come_from_updated_weights_static_from_original():
    w, _, h = correlated_problem(seed=4, out=16)
    fmt = get_format("int4_g128")
    _, dyn = gptq_quantize_weight(w, h, fmt)
    _, stat = gptq_quantize_weight(w, h, fmt, static_groups=True)
    _, ordered = gptq_quantize_weight(w, h, fmt, act_order=True)
    original = [compute_params(w[:, s:s + 128], fmt) for s in (0, 128)]
    assert torch.equal(dyn.params[0].scale, original[0].scale)  # nothing updated before the first group
    assert not torch.equal(dyn.params[1].scale, original[1].scale)  # the second saw the compensation
    for info in (stat, ordered):  # act-order always uses the original groups' params
        for k in range(2):
            assert torch.equal(info.params[k].scale, original[k].scale)
    assert ordered.perm is not None and sorted(ordered.perm.tolist()) == list(range(256))


def test_nv_tensor_scale_comes_from_the_original_weights():
    w, _, h = correlated_problem(seed=5, out=16)
    amax = w.abs().amax()
    q_default, _ = gptq_quantize_weight(w, h, "nvfp4")
    q_given, _ = gptq_quantize_weight(w, h, "nvfp4", tensor_amax=amax)
    q_other, _ = gptq_quantize_weight(w, h, "nvfp4", tensor_amax=3 * amax)  # not a power of two: E4M3 block scales change
    assert torch.equal(q_default, q_given) and not torch.equal(q_default, q_other)


def test_dead_columns_are_zeroed_and_the_rest_still_beats_rtn():
    w, x, h = correlated_problem(seed=2)
    x[:, [5, 77]] = 0
    h = 2 * x.T @ x / x.shape[0]
    for fmt in ("int4", "mxfp4"):
        for act_order in (False, True):
            q, info = gptq_quantize_weight(w, h, fmt, act_order=act_order)
            assert torch.isfinite(q).all() and torch.all(q[:, [5, 77]] == 0)
            assert output_error(w, q, x) < 0.8 * output_error(w, quantize(w, fmt), x)


def test_deterministic():
    w, _, h = correlated_problem(seed=6, out=16)
    for options in ({}, {"act_order": True, "mse_clip": True}):
        a, _ = gptq_quantize_weight(w, h, "nvfp4", **options)
        b, _ = gptq_quantize_weight(w, h, "nvfp4", **options)
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["int4", "int4_asym_g128", "nvfp4", "int3_g32"])
def test_mse_clip_never_worse_per_group_and_sometimes_shrinks(fmt):
    f = get_format(fmt)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) ** 3  # heavy tails
    groups = x.reshape(64, -1, f.group_size) if f.group_size else x
    plain = compute_params(groups, f, x.abs().amax())
    best = _params(groups, f, x.abs().amax(), mse_clip=True)

    def lp(p):
        return (quantize_with_params(groups, p, f) - groups).abs().pow(2.4).sum(-1)

    assert torch.all(lp(best) <= lp(plain))
    assert torch.any(lp(best) < lp(plain))
    assert torch.all(best.scale <= plain.scale)  # only shrinks


def test_mse_clip_changes_the_solution_and_still_beats_rtn():
    w, x, h = correlated_problem(seed=7)
    w = w**3  # heavy tails: clipping pays
    q, _ = gptq_quantize_weight(w, h, "int4", mse_clip=True)
    plain, _ = gptq_quantize_weight(w, h, "int4")
    assert not torch.equal(q, plain)
    assert output_error(w, q, x) < output_error(w, quantize(w, "int4"), x)


def test_hessian_damping_retry_and_errors():
    w, _, _ = correlated_problem(d=64, out=8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))  # rank 4 of 64: singular H
    h = 2 * x.T @ x / 4
    q, info = gptq_quantize_weight(w, h, "int4", damp=0.0)
    assert torch.isfinite(q).all() and info.damp > 0
    with pytest.raises(GPTQError, match="not positive definite"):
        gptq_quantize_weight(w, -torch.eye(64), "int4")
    with pytest.raises(GPTQError, match="non-finite"):
        gptq_quantize_weight(w, torch.full((64, 64), float("nan")), "int4")
    with pytest.raises(InvalidValueError):
        gptq_quantize_weight(w, torch.eye(32), "int4")
    with pytest.raises(InvalidValueError, match="multiple of 128"):
        gptq_quantize_weight(w, torch.eye(64), "int4_g128")


def test_hessian_running_average_equals_batch_formula():
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0))
    hess = Hessian(16)
    for chunk in (x[0], x[1, :7], x[1, 7:], x[2]):
        hess.add(chunk)
    flat = x.reshape(-1, 16).double()
    assert hess.n == 150 and hess.h.dtype == torch.float64  # fp64: thread counts must not move GPTQ
    assert torch.allclose(hess.h, 2 * flat.T @ flat / 150, rtol=1e-12, atol=1e-12)


def test_hessian_hook_sees_the_online_transform_and_shares_one_matrix():
    rot = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))[0]

    class Rotate(nn.Module):
        def forward(self, x):
            return x @ rot

    layer = nn.Module()
    layer.a, layer.b, layer.c = nn.Linear(16, 4), nn.Linear(16, 4), QuantLinear(nn.Linear(16, 4), None, Rotate())
    handles: list = []
    view = SimpleNamespace(site_of=lambda lin: layer.c if lin is layer.c.linear else lin)  # as LayerView.site_of
    hess = _hessian_hooks(view, [[layer.a, layer.b, layer.c.linear]], handles)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    layer.a(x), layer.b(x), layer.c(x)
    for handle in handles:
        handle.remove()
    assert hess[id(layer.a)] is hess[id(layer.b)] and hess[id(layer.c.linear)] is not hess[id(layer.a)]
    x64, xr64 = x.double(), (x @ rot).double()
    assert torch.allclose(hess[id(layer.a)].h, 2 * x64.T @ x64 / 10, atol=1e-5)
    assert torch.allclose(hess[id(layer.c.linear)].h, 2 * xr64.T @ xr64 / 10, atol=1e-5)


# ---- layer-wise driver ---------------------------------------------------------------------------
def tiny_lm(model_type="llama", seed=0):
    """A tiny random decoder built here from its config (hidden 64, 2 layers, default init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                 mlp_only_layers=[]) if model_type == "qwen3_moe" else {}
    config = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  max_position_embeddings=256, tie_word_embeddings=False, **extra)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval().requires_grad_(False)
    return model, get_adapter(model)


def text_windows(n, seqlen, seed):
    """Token windows of generated text: skewed word frequencies give inputs a non-identity covariance
    (uniformly random token ids would give isotropic embeddings, where GPTQ has nothing to exploit)."""
    words = ("the of and to in is was for on as with by at from that which this are be an it his not or have "
             "model block scale format weight token layer expert matrix value river city music season").split()
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, len(words) + 1)
    text = " ".join(words[i] for i in torch.multinomial(zipf, n * seqlen * 2, replacement=True, generator=g))
    ids = torch.tensor(tiny_tokenizer()(text)["input_ids"][: n * seqlen])
    return ids.reshape(n, seqlen)


def layer_outputs(model, tokens):
    outs = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outs.append(out[0] if isinstance(out, tuple) else out))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    return outs, logits


def rtn_copy(model, adapter, fmt):
    rtn_model = copy.deepcopy(model)
    for _name, p in type(adapter)(rtn_model).weight_tensors().items():
        p.data.copy_(quantize(p.data, fmt))
    return rtn_model


def mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4"])
def test_driver_lowers_every_layer_output_error_vs_rtn_on_tiny_llama(fmt):
    model, adapter = tiny_lm("llama")
    calib, held_out = text_windows(32, 64, seed=0), text_windows(8, 64, seed=1)
    ref, ref_logits = layer_outputs(model, held_out)
    rtn_outs, rtn_logits = layer_outputs(rtn_copy(model, adapter, fmt), held_out)
    weights = gptq_quantize_model(model, adapter, calib, fmt)
    outs, logits = layer_outputs(model, held_out)
    for i, (r, o, t) in enumerate(zip(ref, outs, rtn_outs)):
        assert mse(o, r) < 0.8 * mse(t, r), f"layer {i}"  # measured: 0.5-0.6
    assert mse(logits, ref_logits) < 0.8 * mse(rtn_logits, ref_logits)
    params = dict(model.named_parameters())
    assert len(weights) == 2 * 7 and all(torch.equal(params[n], w) for n, w in weights.items())
    report = weights.report
    assert [r["layer"] for r in report["layers"]] == [0, 1] and len(report["linears"]) == 14
    assert report["rtn_fallback"] == [] and report["settings"]["format"] == fmt


def test_true_sequential_changes_only_later_stages_of_the_first_layer():
    model, adapter = tiny_lm("llama")
    calib, held_out = text_windows(16, 64, seed=0), text_windows(8, 64, seed=1)
    ref, _ = layer_outputs(model, held_out)
    rtn, _ = layer_outputs(rtn_copy(model, adapter, "int4"), held_out)
    plain = gptq_quantize_model(copy.deepcopy(model), None, calib, "int4")
    seq = gptq_quantize_model(model, adapter, calib, "int4", true_sequential=True)
    for short in ("q_proj", "k_proj", "v_proj"):  # same inputs in both modes
        name = f"model.layers.0.self_attn.{short}.weight"
        assert torch.equal(plain[name], seq[name])
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert not torch.equal(plain[name], seq[name])
    out, _ = layer_outputs(model, held_out)
    assert mse(out[-1], ref[-1]) < 0.8 * mse(rtn[-1], ref[-1])


def test_driver_on_moe_quantizes_every_expert_with_its_own_tokens():
    model, adapter = tiny_lm("qwen3_moe")
    calib, held_out = text_windows(32, 64, seed=0), text_windows(8, 64, seed=1)
    ref, _ = layer_outputs(model, held_out)
    rtn, _ = layer_outputs(rtn_copy(model, adapter, "int4"), held_out)
    before = {k: v.clone() for k, v in adapter.weight_tensors().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every expert gets tokens here: no RTN fallback warning
        weights = gptq_quantize_model(model, adapter, calib, "int4")
    for k, v in adapter.weight_tensors().items():
        assert not torch.equal(v, before[k]), k
        if "experts" in k:  # GPTQ, not RTN, on every expert
            rtn_k = quantize(before[k], "int4")
            assert all(not torch.equal(v[e], rtn_k[e]) for e in range(v.shape[0])), k
    assert any("experts.gate_up_proj" in n for n in weights) and weights.report["rtn_fallback"] == []
    out, _ = layer_outputs(model, held_out)
    for i in range(2):
        assert mse(out[i], ref[i]) < 0.8 * mse(rtn[i], ref[i]), i  # measured: 0.55-0.65


def test_experts_without_tokens_fall_back_to_rtn_loudly():
    model, adapter = tiny_lm("qwen3_moe")  # 4 experts, top-2
    calib = text_windows(1, 1, seed=0)  # one token: two experts per layer see nothing
    before = {k: v.clone() for k, v in adapter.weight_tensors().items()}
    with pytest.warns(UserWarning, match="no calibration tokens"):
        weights = gptq_quantize_model(model, adapter, calib, "int4")
    fallback = weights.report["rtn_fallback"]
    assert len(fallback) == 4  # 2 layers x (gate_up, down)
    after = adapter.weight_tensors()
    for entry in fallback:
        assert len(entry["experts"]) == 2
        part = "gate_up" if entry["param"].endswith("gate_up_proj") else "down"
        key = f"layers.{entry['layer']}.experts.{part}"
        rtn = quantize(before[key], "int4")
        for e in range(4):
            assert torch.equal(after[key][e], rtn[e]) == (e in entry["experts"]), (key, e)


@pytest.mark.parametrize("fmt", ["int4_g128", "int4", "mxfp4", "nvfp4"])
def test_clip_searched_rtn_never_loses_to_plain_rtn_per_group(fmt):
    """QuaRot's `--w_clip` for RTN weights: each group keeps the shrink with the least Σ|q - w|^2.4, so no
    group is worse than plain RTN, and heavy-tailed weights gain."""
    from harness.formats import get_format, quantize
    from harness.gptq import MSE_NORM, clip_searched_rtn

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) ** 3  # heavy tails: clipping pays
    spec = get_format(fmt)
    group = spec.group_size if spec.granularity == "group" else w.shape[1]
    plain, clipped = quantize(w, spec), clip_searched_rtn(w, spec)

    def err(q):
        return (q - w).abs().pow(MSE_NORM).reshape(-1, group).sum(-1)

    assert (err(clipped) <= err(plain) * (1 + 1e-6)).all()
    if spec.scale_type != "e8m0":  # power-of-two block scales barely move under a <= 20% shrink
        assert err(clipped).sum() < 0.97 * err(plain).sum()
    assert torch.equal(clip_searched_rtn(w, spec), clipped)  # deterministic
