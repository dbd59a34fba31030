"""The KV protocol: a window evaluated under a policy equals decoding it token by token with a cache that
stores exactly what the policy stores; the policy's rule, its validation and its storage accounting."""
from __future__ import annotations

import pytest
import torch

from harness.errors import InvalidValueError, UnknownNameError
from harness.formats import get_format, quantize
from harness.kv import KVPolicy, kv_accounting, policy_cache
from harness.models.tiny import make_tiny_model
from harness.quant import apply_scheme, get_scheme

T = 40


def _ids(tok, n=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, tok.vocab_size, (1, n), generator=g)


def _decode_logits(model, adapter, policy, ids):
    """Token by token through the policy cache, with the model's plain attention reading it."""
    attn = [layer.attn for layer in adapter.layers()]
    cache = policy_cache(policy, attn)
    out = []
    for t in range(ids.shape[1]):
        step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True,
                     position_ids=torch.tensor([[t]]))
        out.append(step.logits[:, -1])
    return torch.stack(out, dim=1)


POLICIES = {
    "all_per_token": dict(format="int2_asym"),
    "past_only": dict(format="int2_asym", window=1),
    "window_sinks": dict(format="int2_asym_g16", window=7, sinks=3),
    "kivi": dict(key="int2_asym_g8", value="int2_asym_g16", key_granularity="per_channel", window=5),
    "kivi_no_window": dict(key="int2_asym_g8", value="int3_asym", key_granularity="per_channel"),
    "per_channel_both_sinks": dict(format="int2_asym_g4", key_granularity="per_channel",
                                   value_granularity="per_channel", sinks=2, window=3),
    "pre_rope": dict(format="int2_asym", pre_rope_keys=True, window=4, sinks=1),
    "pre_rope_kivi": dict(key="int2_asym_g8", value="mxfp4", key_granularity="per_channel", pre_rope_keys=True),
    "mx_keys_only": dict(key="mxfp4", value=None, window=2),
}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_window_evaluation_equals_token_by_token_decoding_with_the_policy_cache(family, name):
    # float64: batched and one-token matmuls differ in the last bits, which would flip a few roundings
    model, tok, adapter = make_tiny_model(family, dtype=torch.float64)
    policy = KVPolicy.from_dict(POLICIES[name])
    ids = _ids(tok)
    with torch.no_grad():
        fp = model(ids).logits
        decoded = _decode_logits(model, adapter, policy, ids)  # plain attention, the policy in the cache
        apply_scheme(model, adapter, {"name": name, "kv": POLICIES[name]})
        window = model(ids).logits
    torch.testing.assert_close(window, decoded, rtol=1e-9, atol=1e-9)
    assert (window - fp).abs().max() > 1e-3  # the policy did quantize something


def test_the_rule_keeps_sinks_window_and_incomplete_groups_full_precision():
    p = KVPolicy.from_dict(dict(key="int2_asym_g4", value="int2_asym", key_granularity="per_channel",
                                window=2, sinks=1))
    q, k = torch.arange(12), torch.arange(12)
    mk, mv = p.read_quantized("key", q, k), p.read_quantized("value", q, k)
    assert not mk[:, 0].any() and not mv[:, 0].any()  # the sink
    # value j (per token) is stored quantized from step j + 2 on; key units are [1..4], [5..8], ...
    assert mv[5].tolist() == [False, True, True, True] + [False] * 8
    assert mk[5].tolist() == [False] * 12 and mk[6, 1:5].all() and not mk[6, 5:].any()
    assert mk[10, :5].tolist() == [False, True, True, True, True] and mk[10, 5:9].all()


def test_position_free_policy_is_the_plain_kv_format_bit_for_bit():
    model, tok, adapter = make_tiny_model("llama")
    ids = _ids(tok)
    with torch.no_grad():
        apply_scheme(model, adapter, "w4a4kv4")
        plain = model(ids).logits
    model, tok, adapter = make_tiny_model("llama")
    s = get_scheme("w4a4kv4")
    with torch.no_grad():
        apply_scheme(model, adapter, {"name": "p", "w": "int4", "a": "int4", "kv": {"key": s.kv, "value": s.kv}})
        policy = model(ids).logits
    assert torch.equal(plain, policy)


def test_per_channel_quantizes_complete_token_groups_per_channel():
    p = KVPolicy(key=get_format("int2_asym_g4"), key_granularity="per_channel", sinks=1)
    x = torch.randn(1, 2, 11, 8)
    out = p.quantize("key", x)
    ref = quantize(x[..., 1:9, :].transpose(-1, -2).contiguous(), "int2_asym_g4").transpose(-1, -2)
    assert torch.equal(out[..., 1:9, :], ref) and torch.equal(out[..., [0, 9, 10], :], x[..., [0, 9, 10], :])


@pytest.mark.parametrize("bad, match", [
    (dict(format="int4_tensor"), "cannot know future tokens"),
    (dict(format="nvfp4"), "cannot know future tokens"),
    (dict(format="int4_asym", key_granularity="per_channel"), "group format"),
    (dict(format="int4_asym", key_granularity="per_head"), "per_token, per_channel"),
    (dict(format="int4_asym", window=-1), "integer >= 0"),
    (dict(compressed=["query"]), "key, value"),
    (dict(compressed=["key"], key_granularity="per_channel", key="int2_asym_g32"), "per_token"),
    (dict(compressed="key"), "a list of roles"),
])
def test_bad_policies_are_one_line_errors(bad, match):
    with pytest.raises(InvalidValueError, match=match):
        KVPolicy.from_dict(bad)


def test_unknown_policy_key_lists_the_valid_ones():
    with pytest.raises(UnknownNameError, match="window"):
        KVPolicy.from_dict(dict(format="int4_asym", windw=3))


def test_accounting_counts_scales_zero_points_and_full_precision_tokens():
    model, _, _ = make_tiny_model("llama")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    p = KVPolicy.from_dict(dict(format="int2_asym_g32", window=16, sinks=4))
    acc = kv_accounting(p, cfg, context=256)
    quantized = 256 - 16 - 4  # the 16 newest tokens and the 4 sinks stay 16-bit
    per_q = 2 + 32 / 32  # 2-bit elements, a 16-bit scale and a 16-bit zero per 32
    expect = (quantized * per_q + (256 - quantized) * 16) / 256
    assert acc["key_bits"] == pytest.approx(expect, abs=1e-4) and acc["value_bits"] == acc["key_bits"]
    n_kv = cfg.num_key_value_heads
    assert acc["bytes_per_token"] == pytest.approx(cfg.num_hidden_layers * n_kv * head_dim * 2 * expect / 8, abs=0.1)
    assert acc["compression_vs_16bit"] == pytest.approx(16 / expect, abs=1e-3)
    plain = kv_accounting(None, cfg, context=256)
    assert plain["bits_per_element"] == 16 and plain["compression_vs_16bit"] == 1


def test_kv_preset_schemes_are_kv_only_policies():
    kivi = get_scheme("kivi2")
    assert kivi.weight is None and kivi.activation is None and isinstance(kivi.kv, KVPolicy)
    assert kivi.kv.key_granularity == "per_channel" and kivi.kv.window == 32
    assert get_scheme("kv4_past_only").kv.window == 1
    assert get_scheme("kivi2").to_dict()["kv"]["key"]["bits"] == 2


def test_the_equality_check_can_fail_and_pre_rope_is_not_post_rope():
    model, tok, adapter = make_tiny_model("llama", dtype=torch.float64)
    ids = _ids(tok)
    pol = dict(format="int2_asym", window=7)
    with torch.no_grad():
        decoded = _decode_logits(model, adapter, KVPolicy.from_dict({**pol, "window": 6}), ids)
        apply_scheme(model, adapter, {"name": "w7", "kv": pol})
        w7 = model(ids).logits
        apply_scheme(model, adapter, {"name": "w7_pre", "kv": {**pol, "pre_rope_keys": True}})
        w7_pre = model(ids).logits
    assert (w7 - decoded).abs().max() > 1e-4  # a window one token shorter is a different cache
    assert (w7 - w7_pre).abs().max() > 1e-4


def test_kv_cost_is_recorded_reported_and_plotted(tmp_path):
    """Through the engine: every record carries its KV cost; the paper report tables and plots it."""
    from harness.driver import run_matrix
    from harness.report.paper import kv_cache_table
    from harness.report.plots import metric_vs_kv_bits
    from harness.spec import load_spec
    from harness.store import Store, load_results

    spec = tmp_path / "kv.yaml"
    spec.write_text("models: [tiny-llama]\nmethods: [fp, rtn, {name: skvq, params: {window: 8, sinks: 2}}]\n"
                    "schemes: [kv4, k2v2_g32]\ntasks: [wikitext2]\nppl: {seqlen: 32, max_windows: 2}\n"
                    "calib: {corpus: c4, n: 2, seqlen: 32}\n")
    store = Store(tmp_path / "res")
    summary = run_matrix(load_spec(spec).cells(), store)
    assert summary.failed == 0, summary.failures
    records = {(r["method"], r["scheme"]): r["kv_cache"] for r in store.records()}
    assert records[("fp", "w16a16")]["compression_vs_16bit"] == 1
    assert records[("rtn", "kv4")]["key_bits"] == pytest.approx(4 + 32 / 32)  # head_dim 32: scale + zero per row
    # the window (8) and sinks (2) of a 32-token context cost bits: 22 quantized tokens at 3 bits, 10 at 16
    assert records[("skvq", "k2v2_g32")]["key_bits"] == pytest.approx((22 * 3 + 10 * 16) / 32, abs=1e-4)
    df = load_results(store.root)
    table = kv_cache_table(df)
    assert set(table["scheme"]) == {"kv4", "k2v2_g32"} and "fp" not in set(table["method"])
    paths = metric_vs_kv_bits(df, "ppl", tmp_path / "plots", task="wikitext2", model="tiny-llama")
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_channel_smoothing_is_the_plain_format_at_identity_and_learnable_quant_matches_it():
    from harness.kv import ChannelSmoothing
    from harness.kv.policy import learnable_fake_quant

    x = torch.randn(2, 3, 7, 16) * torch.linspace(0.1, 5, 16) + torch.linspace(-2, 2, 16)
    fmt = get_format("int4_asym_g8")
    ident = ChannelSmoothing(torch.zeros(48), torch.ones(48))
    assert torch.equal(ident.quantize(x, fmt), quantize(x, fmt))
    torch.testing.assert_close(learnable_fake_quant(x, fmt), quantize(x, fmt), rtol=0, atol=1e-5)
    # centring each channel and equalising its range lowers the error of per-token groups
    smooth = ChannelSmoothing(x.mean((0, 2)).reshape(-1), x.std((0, 2)).reshape(-1))
    assert (smooth.quantize(x, fmt) - x).pow(2).mean() < (quantize(x, fmt) - x).pow(2).mean()
    shift = torch.zeros(48, requires_grad=True)
    scale = torch.ones(48, requires_grad=True)
    ChannelSmoothing(shift, scale).quantize(x, fmt).sub(x).pow(2).sum().backward()
    assert shift.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0


def test_pre_rope_keys_under_an_online_qk_rotation_are_refused():
    from harness.quant import install_kv_quant

    model, tok, adapter = make_tiny_model("llama")
    attn = [layer.attn for layer in adapter.layers()]
    install_kv_quant(model, attn, None, qk_rotation=lambda t: t.flip(-1))
    apply_scheme(model, adapter, {"name": "pre", "kv": dict(format="int4_asym", pre_rope_keys=True)})
    with pytest.raises(NotImplementedError, match="pre_rope_keys: false"), torch.no_grad():
        model(_ids(tok, 8))
