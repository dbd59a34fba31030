"""SKVQ: clusters of similar-range channels share a group, the window and sinks stay full precision,
and the result is the cache SKVQ describes (window evaluation = token-by-token decoding)."""
from __future__ import annotations

import pytest
import torch

from harness.errors import InvalidValueError
from harness.kv import KVPolicy, install_kv_policy, policy_cache
from harness.kv.policy import ChannelGroups
from harness.method import CalibConfig, CalibContext
from harness.models.tiny import make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from harness.formats import quantize
from methods.skvq import cluster_channels


def _ctx(model, tok, adapter, scheme):
    return CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme),
                        calib=CalibConfig(corpus="c4", n=4, seqlen=32), seed=0)


def test_clusters_group_channels_of_similar_range():
    lo = torch.tensor([-1.0, -10, -1.1, -9.5, -0.9, -10.5])
    hi = torch.tensor([1.0, 10, 1.2, 9.0, 0.8, 11.0])
    order, bounds = cluster_channels(lo, hi, 2, seed=0)
    groups = [set(order[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert sorted(groups, key=min) == [{0, 2, 4}, {1, 3, 5}]


def test_channel_groups_quantize_each_cluster_as_one_group():
    x = torch.randn(1, 2, 5, 4)
    order = torch.tensor([3, 0, 7, 1, 2, 4, 5, 6])
    g = ChannelGroups(order, (0, 3, 8))
    fmt = get_scheme("kv2").kv.key
    out = g.quantize(x, fmt)
    flat, oflat = x.transpose(1, 2).reshape(1, 5, 8), out.transpose(1, 2).reshape(1, 5, 8)
    row = fmt.with_(granularity="row", group_size=None)
    assert torch.equal(oflat[..., [3, 0, 7]], quantize(flat[..., [3, 0, 7]], row))
    assert torch.equal(oflat[..., [1, 2, 4, 5, 6]], quantize(flat[..., [1, 2, 4, 5, 6]], row))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_skvq_cache_equals_token_by_token_decoding_and_reordering_changes_it(family):
    model, tok, adapter = make_tiny_model(family, dtype=torch.float64)
    method = get_method("skvq")({"window": 6, "sinks": 2})
    scheme = get_scheme({"name": "k2v2_g16", "kv": "int2_asym_g16"})
    state = method.calibrate(_ctx(model, tok, adapter, scheme))
    assert state.clusters and all(int(c["key_bounds"][-1]) == adapter.attention.num_kv_heads * adapter.head_dim
                                  for c in state.clusters)
    ids = torch.randint(3, tok.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
        method.apply(model, adapter, state, scheme)
        window = model(ids).logits
        attn = [view.attn for view in adapter.layers()]
        install_kv_policy(attn, None)  # the cache stores the policy; attention reads it as it is
        cache = policy_cache(method.policy(scheme), attn)
        steps = [model(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.tensor([[t]])).logits[:, -1]
                 for t in range(ids.shape[1])]
    torch.testing.assert_close(window, torch.stack(steps, 1), rtol=1e-9, atol=1e-9)
    assert (window - fp).abs().max() > 1e-4
    plain, _, plain_adapter = make_tiny_model(family, dtype=torch.float64)
    no_reorder = get_method("skvq")({"window": 6, "sinks": 2, "reorder": False})
    no_reorder.apply(plain, plain_adapter, no_reorder.calibrate(_ctx(plain, tok, plain_adapter, scheme)), scheme)
    with torch.no_grad():
        assert (plain(ids).logits - window).abs().max() > 1e-6


def test_skvq_needs_a_kv_format_and_owns_the_window():
    model, tok, adapter = make_tiny_model("llama")
    method = get_method("skvq")({})
    with pytest.raises(InvalidValueError, match="KV format"):
        method.calibrate(_ctx(model, tok, adapter, "w4a16"))
    with pytest.raises(InvalidValueError, match="sets the window"):
        method.policy(get_scheme("kivi2"))
    p = method.policy(get_scheme("k2v2_g32"))
    assert isinstance(p, KVPolicy) and p.window == 128 and p.sinks == 5 and p.pre_rope_keys
    assert p.key.clip_ratio == 0.96
