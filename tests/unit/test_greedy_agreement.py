"""Greedy-generation agreement: teacher-forced argmax against the FP model's own greedy continuation."""
from __future__ import annotations

import pytest
import torch

from harness.eval.greedy import GreedyReference, greedy_agreement, greedy_continue
from harness.models.tiny import make_tiny_model
from harness.quant import apply_scheme


def test_fp_model_agrees_fully_and_first_divergence_is_free_running_generation():
    model, tok, adapter = make_tiny_model("llama")
    prompts = torch.randint(3, tok.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    ref = GreedyReference(greedy_continue(model, prompts, 10), 12)
    same = greedy_agreement(model, ref)
    assert same.value == 1 and same.extra["first_divergence"] == 10
    apply_scheme(model, adapter, {"name": "kv2", "kv": "int2_asym"})
    q = greedy_agreement(model, ref)
    assert q.value < 1 and len(q.extra["example_scores"]["greedy_agreement"]) == 3
    # the quantized model's own greedy generation is identical for exactly first_divergence steps
    own = greedy_continue(model, prompts, 10)[:, 12:]
    fp = ref.sequences[:, 12:]
    runs = [int((a != b).nonzero()[0]) if (a != b).any() else 10 for a, b in zip(own, fp)]
    assert sum(runs) / 3 == pytest.approx(q.extra["first_divergence"])


def test_greedy_task_runs_in_a_spec_and_claims_read_it(tmp_path):
    from harness.driver import run_matrix
    from harness.report.claims import ResultLookup, evaluate_claim
    from harness.spec import load_spec
    from harness.store import Store, load_results

    spec = tmp_path / "g.yaml"
    spec.write_text("models: [tiny-llama]\nmethods: [fp, rtn]\nschemes: [kv2]\n"
                    "tasks: [greedy]\ngreedy: {prompt_len: 16, new_tokens: 8, prompts: 3}\n")
    store = Store(tmp_path / "res")
    summary = run_matrix(load_spec(spec).cells(), store)
    assert summary.failed == 0, summary.failures
    df = load_results(store.root)
    values = df[df.metric == "greedy_agreement"].set_index("method")["value"]
    assert values["fp"] == 1 and values["rtn"] < 1
    result = evaluate_claim("agreement(rtn, kv2) < agreement(fp, w16a16)", ResultLookup(df))
    assert result.verdict in ("reproduced", "inconclusive")
