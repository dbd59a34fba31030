"""MoE routing fidelity (harness/eval/routing.py): expert-selection agreement and router KL against the FP
model on the same windows, expert loads on evaluation and calibration windows."""
from __future__ import annotations

import pytest
import torch

from harness.errors import InvalidValueError
from harness.eval.routing import RoutingReference, _route, routing_fidelity
from harness.models.tiny import make_tiny_model


def reference_of(model, windows) -> RoutingReference:
    return RoutingReference(windows, _route(model, windows))


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
@torch.no_grad()
def test_the_fp_model_agrees_with_itself_and_a_perturbed_router_does_not(family):
    model, tok, adapter = make_tiny_model(family)
    windows = torch.randint(3, len(tok), (3, 24), generator=torch.Generator().manual_seed(0))
    ref = reference_of(model, windows)
    same = routing_fidelity(model, ref)
    assert same.value == 1.0 and same.extra["router_kl"] == 0.0 and same.extra["routing_overlap"] == 1.0
    top_k, experts = adapter.layer(0).experts.top_k, adapter.layer(0).experts.num_experts
    load = same.extra["expert_load"]
    assert set(load) == {"0", "1"} and all(sum(c) == 3 * 24 * top_k and len(c) == experts for c in load.values())
    router = adapter.layer(1).experts.router
    router.weight.add_(torch.randn_like(router.weight) * router.weight.std())
    moved = routing_fidelity(model, ref)
    assert moved.extra["routing_agreement.layer0"] == 1.0  # layer 0's router is untouched
    assert moved.extra["routing_agreement.layer1"] < 1.0 and moved.extra["router_kl.layer1"] > 0
    assert moved.value == pytest.approx((1.0 + moved.extra["routing_agreement.layer1"]) / 2)
    # overlap: a softer measure, between the set agreement and 1
    assert moved.extra["routing_agreement.layer1"] <= moved.extra["routing_overlap.layer1"] < 1.0
    assert len(moved.extra["example_scores"]["routing_agreement"]) == 3


def test_a_dense_model_is_refused_in_one_line():
    model, tok, _ = make_tiny_model("llama")
    with pytest.raises(InvalidValueError, match="an MoE model"):
        _route(model, torch.zeros(1, 8, dtype=torch.long))


def test_routing_task_in_a_spec_records_loads_and_claims_read_it(tmp_path):
    from harness.driver import run_matrix
    from harness.report.claims import ResultLookup, evaluate_claim
    from harness.spec import load_spec
    from harness.store import Store, load_results

    spec = tmp_path / "r.yaml"
    spec.write_text("models: [tiny-qwen3-moe]\nmethods: [fp, rtn]\nschemes: [w4a4]\ntasks: [routing]\n"
                    "routing: {seqlen: 32, windows: 3}\ncalib: {corpus: wikitext2, n: 2, seqlen: 32}\n")
    store = Store(tmp_path / "res")
    summary = run_matrix(load_spec(spec).cells(), store)
    assert summary.failed == 0, summary.failures
    df = load_results(store.root)
    rows = df[df.metric == "routing_agreement"].set_index("method")
    assert rows.loc["fp", "value"] == 1 and rows.loc["rtn", "value"] < 1
    import json

    record = next(json.loads(p.read_text()) for p in (tmp_path / "res").rglob("*.json")
                  if '"method": "rtn"' in p.read_text() and "calib_tokens_per_expert" in p.read_text())
    calib = record["info"]["calib_tokens_per_expert"]
    assert all(sum(c) == 2 * 32 * 2 for c in calib.values())  # every calibration token, top-2
    result = evaluate_claim("routing(rtn, w4a4) < routing(fp, w16a16)", ResultLookup(df))
    assert result.verdict in ("reproduced", "inconclusive")
    kl = evaluate_claim("router_kl(rtn, w4a4) > router_kl(fp, w16a16)", ResultLookup(df))
    assert kl.verdict in ("reproduced", "inconclusive")
    from harness.report.plots import routing_by_layer

    assert any(p.suffix == ".png" for p in routing_by_layer(df, tmp_path / "plots", model="tiny-qwen3-moe"))
