"""EAC-MoE's QESC (methods/eac_moe.py): router re-calibration after quantization raises the expert-selection
agreement with the FP model on the calibration tokens and brings the router distributions closer to the FP
ones on held-out windows."""
from __future__ import annotations

import pytest
import torch

from harness.eval.routing import RoutingReference, _route, routing_fidelity
from harness.method import CalibConfig, CalibContext
from harness.models.tiny import make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method

SCHEME = {"name": "w3", "weight": "int3_asym_g32"}


def quantized(method: str, params: dict, family: str = "qwen3_moe", n: int = 32):
    model, tok, adapter = make_tiny_model(family)
    g = torch.Generator().manual_seed(5)
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(SCHEME),
                       calib=CalibConfig("wikitext2", n, 64))
    ctx._inputs = torch.randint(3, len(tok), (n, 64), generator=g)
    m = get_method(method)(params)
    state = m.calibrate(ctx)
    fresh, _, fresh_adapter = make_tiny_model(family)
    out = m.apply(fresh, fresh_adapter, state, get_scheme(SCHEME))
    return out, state, m


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
@torch.no_grad()
def test_qesc_raises_expert_selection_agreement_over_the_uncalibrated_quantized_model(family):
    fp, tok, _ = make_tiny_model(family)
    held_out = torch.randint(3, len(tok), (4, 48), generator=torch.Generator().manual_seed(9))
    ref = RoutingReference(held_out, _route(fp, held_out))
    gptq, _, _ = quantized("gptq", {"block_size": 32}, family)
    eac, state, method = quantized("eac_moe", {"block_size": 32, "steps": 100, "lr": 1e-2}, family)
    before, after = routing_fidelity(gptq, ref), routing_fidelity(eac, ref)
    # held out: the router distributions move towards the FP ones (exact top-k sets are a harder target:
    # on a tiny random model with 2048 calibration tokens they move by about the noise)
    assert after.extra["router_kl"] < 0.9 * before.extra["router_kl"]
    meta = state.meta  # on the calibration tokens: the router's own objective and the top-k agreement
    assert all(a <= b for a, b in zip(meta["kl_after"], meta["kl_before"]))
    assert sum(meta["agreement_after"]) > sum(meta["agreement_before"])
    # the experts are GPTQ's own: only the routers differ from plain GPTQ
    assert set(state.routers) == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert torch.equal(eac.model.layers[0].mlp.experts.gate_up_proj, gptq.model.layers[0].mlp.experts.gate_up_proj)
    m = method.metrics(eac, None)
    assert m["calib_agreement_after"] > m["calib_agreement_before"]


def test_a_dense_model_is_refused_in_one_line():
    from harness.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="an MoE model"):
        quantized("eac_moe", {"steps": 1}, "llama")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "llama_cmoe"])
@torch.no_grad()
def test_pesf_removes_the_least_selected_experts_from_the_pool(family):
    from harness.models import load_model
    from harness.models.adapters.routing import prune_experts

    model, tok, adapter = load_model("tiny-llama-cmoe") if family == "llama_cmoe" else make_tiny_model(family)
    x = torch.randn(64, model.config.hidden_size)
    router = adapter.layer(0).experts.router
    logits, weights, index = router(x)
    prune_experts(router, [0])
    logits2, weights2, index2 = router(x)
    assert torch.equal(logits, logits2) and not (index2 == 0).any()
    kept = ~(index == 0).any(-1)  # tokens that did not pick expert 0 keep their experts
    assert torch.equal(index[kept], index2[kept])
    if family != "llama_cmoe":  # the distribution is renormalised over the remaining experts
        probs = torch.softmax(logits.float()[:, 1:], -1)
        top = probs.topk(router.top_k, -1).values
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        assert torch.allclose(weights2.float(), top, atol=1e-6)


def test_eac_moe_prunes_as_configured():
    model, state, method = quantized("eac_moe", {"block_size": 32, "steps": 5, "prune_fraction": 0.5})
    assert {k: len(v) for k, v in state.pruned.items()} == {"0": 2, "1": 2}  # 4 experts, top-2 kept
    assert method.metrics(model, None)["experts_kept_fraction"] == 0.5
    ids = torch.randint(3, 500, (2, 32))
    from harness.eval.routing import _route

    for layer, (_, index) in _route(model, ids)[0].items():
        assert not set(index.reshape(-1).tolist()) & set(state.pruned[str(layer)])
