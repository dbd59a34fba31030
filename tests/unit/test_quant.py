"""harness.quant: schemes, QuantLinear, fused-expert quantization, KV-cache quantization, apply_scheme."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness.errors import InvalidValueError, UnknownNameError
from harness.formats import get_format, quantize
from harness.models import make_tiny_model
from harness.quant import (
    set_kv_format,
    QuantExperts,
    QuantLinear,
    QuantScheme,
    apply_scheme,
    get_scheme,
    install_kv_quant,
    kv_quant_installed,
    list_schemes,
)

TEXT = "the model rotation block value of the city was first"
MOE = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def logits(model, tok, text=TEXT):
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def quantized(family, scheme, **kwargs):
    model, tok, adapter = make_tiny_model(family)
    ref = logits(model, tok)
    apply_scheme(model, adapter, scheme, **kwargs)
    return model, tok, adapter, ref, logits(model, tok)


# ---- schemes -----------------------------------------------------------------------------------
REQUIRED = ["w16a16", "w8a8", "w4a16_g128", "w4a16_asym_g128", "w4a4", "w4a4kv4", "w4a8", "mxfp4", "mxfp4_w",
            "mxfp4_wa", "mxfp4_kv", "mxfp8", "nvfp4", "nvfp4_w", "mxint4", "mxint8", "nvint4"]


def test_required_presets_exist_and_say_what_they_quantize():
    assert set(REQUIRED) <= set(list_schemes())
    w8a8 = get_scheme("w8a8")
    assert (w8a8.weight.bits, w8a8.weight.granularity, w8a8.activation.granularity) == (8, "row", "row")
    w4a4kv4 = get_scheme("w4a4kv4")
    assert w4a4kv4.kv.bits == 4 and not w4a4kv4.kv.symmetric and w4a4kv4.kv.granularity == "row"
    assert get_scheme("w4a16_g128").weight.group_size == 128 and get_scheme("w4a16_g128").activation is None
    assert get_scheme("mxfp4_w").activation is None and get_scheme("mxfp4_kv").kv.name == "mxfp4"
    assert get_scheme("w16a16").is_identity
    d = get_scheme("nvfp4").to_dict()
    assert d["weight"]["name"] == "nvfp4" and {"lm_head", "embeddings", "router"} <= set(d["full_precision"])


def test_scheme_from_dicts_and_errors():
    s = get_scheme({"w": "mxfp4", "a": "mxfp4", "kv": None})
    assert s.weight.name == s.activation.name == "mxfp4" and s.kv is None and s.name == "custom"
    s = get_scheme({"name": "mx_ceil", "weight": {"format": "mxfp4", "scale_rounding": "ceil"}, "a": "mxfp4"})
    assert s.weight.scale_rounding == "ceil" and s.to_dict()["weight"]["scale_rounding"] == "ceil"
    head = get_scheme({"w": "int8", "lm_head": True})
    assert "lm_head" not in head.to_dict()["full_precision"] and head.to_dict()["also_quantized"] == ["lm_head"]
    assert "also_quantized" not in get_scheme("w4a4").to_dict()
    with pytest.raises(UnknownNameError, match="w5a5"):
        get_scheme("w5a5")
    with pytest.raises(UnknownNameError, match="bias"):
        get_scheme({"bias": "int4"})
    with pytest.raises(InvalidValueError, match="lm_head"):
        get_scheme({"lm_head": "yes"})


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_every_preset_applies_to_tiny_models(family):
    for name in list_schemes():
        *_, out = quantized(family, name)
        assert torch.isfinite(out).all(), name


# ---- identity and 16-bit -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def test_identity_scheme_is_bit_exact(family):
    model, tok, adapter, ref, out = quantized(family, "w16a16")
    assert torch.equal(ref, out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_sixteen_bit_formats_leave_logits_unchanged():
    # 16-bit INT weights and activations: each rounding is ~2^-16 of its row's range; the tiny random
    # models amplify it (weights of std 0.2), still far below anything that changes a prediction
    for family in ("llama", "qwen3_moe"):
        errors = {}
        for bits in (12, 16):
            scheme = QuantScheme(f"int{bits}", weight=get_format(f"int{bits}"), activation=get_format(f"int{bits}"))
            *_, ref, out = quantized(family, scheme)
            errors[bits] = float((out - ref).abs().max() / ref.abs().max())
        assert 0 < errors[16] < 2e-3 and errors[16] < errors[12] / 4  # it ran, and error shrinks with bits
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_w4a4_changes_logits_and_8_bit_less_than_4_bit():
    *_, ref, w8 = quantized("llama", "w8a8")
    *_, ref4, w4 = quantized("llama", "w4a4")
    assert torch.equal(ref, ref4)
    assert (w4 - ref).abs().mean() > 2 * (w8 - ref).abs().mean() > 0


# ---- QuantLinear --------------------------------------------------------------------------------
def test_quant_linear_matches_an_independent_computation_and_keeps_dtype():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    q = QuantLinear(lin, act_format=get_format("mxfp4"))
    q.keep_fp_weight()
    q.quantize_weight("int4_g32")
    x = torch.randn(3, 5, 64)
    expected = F.linear(quantize(x, "mxfp4"), quantize(w, "int4_g32"), b)
    assert torch.equal(q(x), expected) and torch.equal(q.fp_weight, w)
    assert q.weight_format.name == "int4_g32" and q.in_features == 64 and q.out_features == 32
    # online input transform runs before the activation quantizer
    h = torch.linalg.qr(torch.randn(64, 64))[0]
    q.input_transform = lambda t: t @ h
    assert torch.equal(q(x), F.linear(quantize(x @ h, "mxfp4"), q.weight, b))
    q.input_transform = None
    xb = x.to(torch.bfloat16)
    qb = QuantLinear(torch.nn.Linear(64, 32).to(torch.bfloat16), act_format=get_format("int8"))
    assert qb(xb).dtype == torch.bfloat16


def test_keep_fp_weights_and_lm_head_embeddings_default_full_precision():
    model, tok, adapter = make_tiny_model("qwen3_moe")
    head, emb = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    gate_up_before = model.model.layers[0].mlp.experts.gate_up_proj.clone()
    apply_scheme(model, adapter, "w4a4", keep_fp_weights=True)
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, emb)
    assert not isinstance(model.lm_head, QuantLinear)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.fp_weight, q_before) and torch.equal(q_proj.weight, quantize(q_before, "int4"))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and torch.equal(experts.fp_gate_up, gate_up_before)
    assert model.ptqbench_scheme == get_scheme("w4a4").to_dict()


def test_lm_head_and_embedding_flags_and_tied_tables():
    model, tok, adapter = make_tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 is
    emb = model.model.embed_tokens.weight.clone()
    apply_scheme(model, adapter, {"w": "int4", "a": "int8", "lm_head": True})
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.act_format.name == "int8"
    assert torch.equal(model.lm_head.weight, quantize(emb, "int4"))
    assert torch.equal(model.model.embed_tokens.weight, emb)  # untied first: the embeddings stayed FP
    model, tok, adapter = make_tiny_model("llama")
    emb = model.model.embed_tokens.weight.clone()
    apply_scheme(model, adapter, {"w": "int4", "embeddings": True})
    assert torch.equal(model.model.embed_tokens.weight, quantize(emb, "int4"))
    assert not isinstance(model.lm_head, QuantLinear)


def test_quantize_weights_false_leaves_weights_to_the_method():
    model, tok, adapter = make_tiny_model("llama")
    before = {k: v.clone() for k, v in adapter.weight_tensors().items()}
    apply_scheme(model, adapter, "w4a4", quantize_weights=False)
    assert all(torch.equal(v, before[k]) for k, v in adapter.weight_tensors().items())
    assert model.model.layers[0].mlp.down_proj.act_format.name == "int4"


def test_scheme_application_on_a_copy_keeps_the_original():
    model, tok, adapter = make_tiny_model("qwen2_moe")
    ref = logits(model, tok)
    clone = copy.deepcopy(model)
    apply_scheme(clone, type(adapter)(clone), "w4a4kv4")
    assert torch.equal(logits(model, tok), ref) and not kv_quant_installed(model) and kv_quant_installed(clone)


# ---- fused MoE experts --------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("scheme", ["mxfp4_w", "w4a4"])
def test_every_expert_weight_changes_under_weight_quantization(family, scheme):
    model, tok, adapter = make_tiny_model(family)
    before = {r.name: r.weight.clone() for r in adapter.linear_weights()}
    assert sum("experts" in n for n in before) == 2 * 2 * 4  # 2 layers x (gate_up, down) x 4 experts
    apply_scheme(model, adapter, scheme)
    fmt = get_scheme(scheme).weight
    for ref in adapter.linear_weights():
        assert not torch.equal(ref.weight, before[ref.name]), f"{ref.name} stayed in full precision"
        assert torch.equal(ref.weight, quantize(before[ref.name], fmt)), ref.name  # per-slice RTN


@pytest.mark.parametrize("family", MOE)
def test_quant_experts_without_quantizers_equals_the_eager_experts(family):
    model, tok, adapter = make_tiny_model(family)
    original = adapter.layers()[0].experts.module
    model.config._experts_implementation = "eager"  # transformers' own per-expert loop
    x = torch.randn(7, adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    _, weights, index = adapter.layers()[0].experts.router(x)
    ref = original(x, index, weights)
    assert torch.equal(QuantExperts(original)(x, index, weights), ref)
    model.config._experts_implementation = "grouped_mm"  # the default kernel: same up to fp32 rounding
    torch.testing.assert_close(QuantExperts(original)(x, index, weights), original(x, index, weights))


def test_quant_experts_quantizes_both_expert_inputs():
    """Reference computed token by token from the formula, with harness.formats.quantize."""
    model, tok, adapter = make_tiny_model("qwen3_moe")
    experts = adapter.layers()[0].experts
    x = torch.randn(6, adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    _, weights, index = experts.router(x)
    module = QuantExperts(experts.module, act_format=get_format("mxfp4"))
    out = module(x, index, weights)
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        xq = quantize(x[t:t + 1], "mxfp4")
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            h = F.silu(F.linear(xq, experts.gate(e))) * F.linear(xq, experts.up(e))
            expected[t] += weights[t, slot] * F.linear(quantize(h, "mxfp4"), experts.down[e])[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)  # summation order differs
    plain = QuantExperts(experts.module)(x, index, weights)
    assert not torch.allclose(out, plain, atol=1e-3)


# ---- KV cache -------------------------------------------------------------------------------------
def _spy_attention(calls):
    """An inner attention implementation that records what it receives, then runs sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, query.clone(), key.clone(), value.clone()))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ptqbench_test_spy", spy)
    AttentionMaskInterface.register("ptqbench_test_spy", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return "ptqbench_test_spy"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_kv_quantization_quantizes_k_after_rope_and_v_per_head(family):
    model, tok, adapter = make_tiny_model(family)
    ref = logits(model, tok)
    calls: list = []
    model.set_attn_implementation(_spy_attention(calls))
    assert torch.equal(logits(model, tok), ref)
    fp_calls = list(calls)
    calls.clear()
    fmt = get_format("int4_asym")
    apply_scheme(model, adapter, QuantScheme("kv4", kv=fmt))
    out = logits(model, tok)
    assert kv_quant_installed(model) and not torch.equal(out, ref)
    assert [c[0] for c in calls] == list(range(adapter.num_layers))  # every layer, in the prefill forward
    layer0, fp0 = calls[0], fp_calls[0]
    n_tok = ref.shape[1]
    assert layer0[2].shape == (1, adapter.num_kv_heads, n_tok, adapter.head_dim)
    assert torch.equal(layer0[1], fp0[1])  # Q untouched
    assert torch.equal(layer0[2], quantize(fp0[2], fmt)) and torch.equal(layer0[3], quantize(fp0[3], fmt))
    # off again: bit-identical to the plain model
    for layer in adapter.layers():
        set_kv_format(layer.attn, None)
    assert torch.equal(logits(model, tok), ref)


def test_kv_wrapper_keeps_padding_masks_and_sliding_windows():
    for family in ("llama", "mistral"):
        model, tok, adapter = make_tiny_model(family)
        if family == "mistral":
            model.config.sliding_window = 4  # shorter than the input: the window mask matters
        batch = tok([TEXT, "river city"], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            ref = model(**batch).logits
        install_kv_quant(model, [layer.attn for layer in adapter.layers()], None)
        with torch.no_grad():
            out = model(**batch).logits
        assert torch.equal(out, ref), family


def test_qk_rotation_is_applied_before_kv_quantization_and_cancels_without_it():
    model, tok, adapter = make_tiny_model("llama")
    ref = logits(model, tok)
    r = torch.linalg.qr(torch.randn(adapter.head_dim, adapter.head_dim, generator=torch.Generator().manual_seed(0)))[0]
    calls: list = []
    model.set_attn_implementation(_spy_attention(calls))
    logits(model, tok)
    fp0 = calls[0]
    calls.clear()
    attn = [layer.attn for layer in adapter.layers()]
    install_kv_quant(model, attn, None, qk_rotation=lambda t: t @ r)
    torch.testing.assert_close(logits(model, tok), ref, rtol=1e-4, atol=1e-4)  # (qR)(kR)ᵀ = qkᵀ
    assert torch.allclose(calls[0][1], fp0[1] @ r, atol=1e-6) and torch.allclose(calls[0][2], fp0[2] @ r, atol=1e-6)
    calls.clear()
    install_kv_quant(model, attn, get_format("int4_asym"))
    logits(model, tok)
    torch.testing.assert_close(calls[0][2], quantize(fp0[2] @ r, "int4_asym"), rtol=0, atol=1e-5)


def test_generation_runs_with_kv_quantization():
    model, tok, adapter = make_tiny_model("qwen3_moe")
    apply_scheme(model, adapter, "w4a4kv4")
    ids = tok(TEXT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 4)


def test_shared_inputs_are_quantized_once_with_the_same_result(monkeypatch):
    """q/k/v read one tensor, gate/up another: with the cache, each is quantized once per layer."""
    import harness.quant.quantizer as quantizer

    model, tok, adapter = make_tiny_model("llama")
    apply_scheme(model, adapter, "w4a4")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    calls = []

    def counting(x, fmt, *args, **kwargs):
        calls.append(tuple(x.shape))
        return quantize(x, fmt, *args, **kwargs)

    monkeypatch.setattr(quantizer, "quantize", counting)
    with torch.no_grad():
        cached = model(ids).logits
    per_layer = len(calls) / model.config.num_hidden_layers
    assert per_layer == 4  # attention input, o_proj input, MLP input, down_proj input
    calls.clear()
    with torch.inference_mode():  # inference tensors carry no version counter
        assert torch.equal(model(ids).logits, cached)
    assert len(calls) / model.config.num_hidden_layers == 4
    calls.clear()
    uncached = model(ids).logits.detach()  # grad mode: no cache, 7 quantizations per layer
    assert len(calls) / model.config.num_hidden_layers == 7
    assert torch.equal(cached, uncached)
