from __future__ import annotations

import math
import operator

import pandas as pd
import pytest

from harness.report.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    NOT_RUN,
    REPRODUCED,
    ClaimError,
    Estimate,
    ResultLookup,
    evaluate_claim,
)


def results(rows):
    base = {"model": "m", "task": "wikitext2", "status": "done", "error": None, "metric": "ppl"}
    return pd.DataFrame([{**base, **r} for r in rows])


@pytest.fixture
def lookup():
    df = results(
        [
            {"method": "rtn", "scheme": "mxfp4", "value": 40.0, "seed": 0},
            {"method": "brq", "scheme": "mxfp4", "value": 30.0, "seed": 0},
            {"method": "brq", "scheme": "mxfp4", "value": 31.0, "seed": 1},
            {"method": "torq", "scheme": "mxfp4", "value": 29.0, "seed": 0},
            {"method": "torq", "scheme": "mxfp4", "value": 32.0, "seed": 1},
            {"method": "fp", "scheme": "w16a16", "value": 20.0, "seed": 0},
            {"method": "sq", "scheme": "w8a8", "value": 20.3, "seed": 0},
            {"method": "torq", "scheme": "mxfp4", "value": 0.1, "seed": 0, "metric": "method.block_cv_after"},
            {"method": "torq", "scheme": "mxfp4", "value": 1.2, "seed": 0, "metric": "method.block_cv_before"},
            {"method": "bad", "scheme": "mxfp4", "value": float("nan"), "status": "failed", "error": "boom",
             "metric": None},
        ]
    )
    return ResultLookup(df, default_ppl_task="wikitext2")


def test_chained_comparison_reproduced(lookup):
    r = evaluate_claim("ppl(brq, mxfp4) < ppl(rtn, mxfp4)", lookup)
    assert r.verdict == REPRODUCED
    assert r.values["ppl(brq, mxfp4)"].mean == 30.5 and r.values["ppl(brq, mxfp4)"].n == 2


def test_not_reproduced_and_inconclusive_within_seed_noise(lookup):
    assert evaluate_claim("ppl(rtn, mxfp4) < ppl(brq, mxfp4)", lookup).verdict == NOT_REPRODUCED
    # torq 30.5±2.1 vs brq 30.5±0.7: the difference is inside seed noise
    assert evaluate_claim("ppl(torq, mxfp4) < ppl(brq, mxfp4)", lookup).verdict == INCONCLUSIVE
    chained = evaluate_claim("ppl(torq, mxfp4) < ppl(brq, mxfp4) < ppl(rtn, mxfp4)", lookup)
    assert chained.verdict == INCONCLUSIVE


def test_approx_and_arithmetic(lookup):
    assert evaluate_claim("approx(ppl(sq, w8a8), ppl(fp, w16a16), rel=0.02)", lookup).verdict == REPRODUCED
    assert evaluate_claim("approx(ppl(sq, w8a8), ppl(fp, w16a16), rel=0.001)", lookup).verdict == NOT_REPRODUCED
    assert evaluate_claim("ppl(rtn, mxfp4) - ppl(fp, w16a16) > 10", lookup).verdict == REPRODUCED


def test_dotted_metric_names(lookup):
    check = "metric(method.block_cv_after, torq, mxfp4) < metric(method.block_cv_before, torq, mxfp4)"
    r = evaluate_claim(check, lookup)
    assert r.verdict == REPRODUCED and r.values["metric(method.block_cv_after, torq, mxfp4)"].mean == 0.1


def test_missing_or_failed_runs_are_not_run(lookup):
    r = evaluate_claim("ppl(bad, mxfp4) < ppl(rtn, mxfp4)", lookup)
    assert r.verdict == NOT_RUN and "boom" in r.detail
    assert evaluate_claim("ppl(nosuch, mxfp4) < 3", lookup).verdict == NOT_RUN


def test_a_diverged_run_counts_with_its_value_and_is_flagged():
    df = results([
        {"method": "quarot", "scheme": "w4a4", "value": 900.0},
        {"method": "rtn", "scheme": "w4a4", "value": 22000.0, "status": "failed",
         "error": "[eval] RunFailure: diverged: ppl=2.2e+04 on wikitext2 exceeds 10000"},
        {"method": "nan", "scheme": "w4a4", "value": float("nan"), "status": "failed",
         "error": "[eval] NonFiniteError: NaN logits"},
    ])
    lookup = ResultLookup(df, default_ppl_task="wikitext2")
    r = evaluate_claim("ppl(quarot, w4a4) < ppl(rtn, w4a4)", lookup)
    assert r.verdict == REPRODUCED and r.values["ppl(rtn, w4a4)"].diverged == 1
    assert evaluate_claim("ppl(rtn, w4a4) < ppl(quarot, w4a4)", lookup).verdict == NOT_REPRODUCED
    other = evaluate_claim("ppl(quarot, w4a4) < ppl(nan, w4a4)", lookup)  # any other failure: not run
    assert other.verdict == NOT_RUN and "NaN logits" in other.detail


def test_two_diverged_runs_are_inconclusive_whichever_collapsed_further():
    diverged = "[eval] RunFailure: diverged: ppl={} on wikitext2 exceeds 10000"
    df = results([
        {"method": "quarot", "scheme": "w4a4", "value": 5.0e7, "status": "failed", "error": diverged.format("5e7")},
        {"method": "rtn", "scheme": "w4a4", "value": 6.0e8, "status": "failed", "error": diverged.format("6e8")},
    ])
    r = evaluate_claim("ppl(quarot, w4a4) < ppl(rtn, w4a4)", ResultLookup(df, default_ppl_task="wikitext2"))
    assert r.verdict == INCONCLUSIVE and "both sides diverged" in r.detail


@pytest.mark.parametrize("check", ["ppl(rtn mxfp4) <", "__import__('os')", "ppl(rtn, mxfp4) == 3", "foo(rtn, mxfp4) < 1"])
def test_bad_claims_raise_one_line_errors(lookup, check):
    with pytest.raises(ClaimError) as err:
        evaluate_claim(check, lookup, claim_id="c1")
    assert "\n" not in str(err.value)


def test_a_claim_is_checked_per_model_not_averaged_over_models():
    """(#12.1) Full scales list 2-3 models; a claim's values were averaged over them (std across models)."""
    import pandas as pd

    from harness.report.paper import check_claims

    rows = [{"model": model, "method_label": method, "method": method, "scheme": "mxfp4", "task": "wikitext2",
             "metric": "ppl", "value": value, "status": "done", "error": None}
            for model, method, value in [("a", "brq", 10.0), ("a", "rtn", 12.0), ("b", "brq", 30.0), ("b", "rtn", 20.0)]]
    spec = {"claims": [{"id": "c", "check": "ppl(brq, mxfp4) < ppl(rtn, mxfp4)"},
                       {"id": "only_b", "model": "b", "check": "ppl(brq, mxfp4) < ppl(rtn, mxfp4)"}]}
    results = check_claims(spec, pd.DataFrame(rows))
    got = {(r.id, r.model): r.verdict for r in results}
    assert got == {("c", "a"): REPRODUCED, ("c", "b"): NOT_REPRODUCED, ("only_b", "b"): NOT_REPRODUCED}
    assert all(v.n == 1 and v.std == 0 for r in results for v in r.values.values())


def test_a_ratio_carries_a_relative_spread():
    """(#12.1) x and / added absolute stds: a ratio of 1.53 printed ± 83."""
    a, b = Estimate(100.0, 10.0, 2), Estimate(50.0, 5.0, 2)
    ratio = a._combine(b, operator.truediv)
    assert ratio.mean == 2.0 and abs(ratio.std - 2.0 * math.hypot(0.1, 0.1)) < 1e-12
    assert a._combine(b, operator.sub).std == math.hypot(10.0, 5.0)


# ---- paired bootstrap intervals (harness.report.intervals) ----------------------------------------------
import json  # noqa: E402

import numpy as np  # noqa: E402

from harness.report.claims import CONTRADICTED  # noqa: E402

TOKENS = 255  # predicted tokens per window


def window_rows(method, nll, seed=0, seqlen=256, scheme="s"):
    """A perplexity record with per-window NLL sums (what ppl records store in info.window_nll)."""
    nll = np.asarray(nll, dtype=np.float64)
    return {"method": method, "scheme": scheme, "seed": seed, "value": math.exp(nll.sum() / (len(nll) * TOKENS)),
            "info.window_nll": json.dumps(nll.tolist()), "protocol.tokens_predicted": len(nll) * TOKENS,
            "protocol.seqlen": seqlen, "protocol.bos_per_window": False, "run_id": f"{method}-{seed}-{seqlen}"}


def _hard_windows(n=16, seed=0):
    """Per-window NLL sums whose window-to-window spread (x0.5..x2 in per-token NLL) dwarfs a 2% effect."""
    return np.random.default_rng(seed).uniform(1.5, 4.5, n) * TOKENS


def test_a_small_consistent_gain_is_reproduced_paired_and_inconclusive_unpaired():
    base = _hard_windows()
    better = base * 0.98  # 2% lower NLL on every window
    paired = ResultLookup(results([window_rows("a", better), window_rows("b", base)]))
    r = evaluate_claim("ppl(a, s) < ppl(b, s)", paired)
    assert r.verdict == REPRODUCED and r.comparisons[0]["paired"]
    low, high = r.comparisons[0]["ratio_ci95"]
    assert low < r.comparisons[0]["ratio"] < high < 1.0
    # the same two numbers on different window cuts (another seqlen): no pairing, the window noise stays
    unpaired = ResultLookup(results([window_rows("a", better, seqlen=255), window_rows("b", base)]))
    r = evaluate_claim("ppl(a, s) < ppl(b, s)", unpaired)
    assert r.verdict == INCONCLUSIVE and not r.comparisons[0]["paired"] and "unpaired" in r.detail


def test_the_opposite_beyond_noise_is_contradicted_and_the_interval_is_printed():
    base = _hard_windows()
    lookup = ResultLookup(results([window_rows("a", base * 1.05), window_rows("b", base)]))
    r = evaluate_claim("ppl(a, s) < ppl(b, s)", lookup)
    assert r.verdict == CONTRADICTED
    assert r.comparisons[0]["margin_ci95"][1] < 0 and "ratio 1.1" in r.detail and "[" in r.detail


def test_seed_spread_widens_a_paired_interval():
    base = _hard_windows()
    one = ResultLookup(results([window_rows("a", base * 0.99), window_rows("b", base)]))
    noisy = ResultLookup(results([window_rows("a", base * 0.99 * f, seed=i) for i, f in enumerate((0.95, 1.0, 1.05))]
                                 + [window_rows("b", base)]))
    width = {}
    for name, lookup in (("one", one), ("seeds", noisy)):
        low, high = evaluate_claim("ppl(a, s) < ppl(b, s)", lookup).comparisons[0]["ratio_ci95"]
        width[name] = high - low
    assert width["seeds"] > 3 * width["one"]
    assert evaluate_claim("ppl(a, s) < ppl(b, s)", noisy).verdict == INCONCLUSIVE


def test_ratio_and_approx_claims_use_the_interval_of_their_quantity():
    base = _hard_windows()
    # 0.1 nats less on every token of every window: the ratio is exp(-0.1) on any resample of the windows
    lookup = ResultLookup(results([window_rows("a", base - 0.1 * TOKENS), window_rows("b", base)]))
    ratio = math.exp(-0.1)
    assert evaluate_claim(f"ppl(a, s) / ppl(b, s) < {ratio * 1.02}", lookup).verdict == REPRODUCED
    assert evaluate_claim(f"ppl(a, s) / ppl(b, s) < {ratio * 0.98}", lookup).verdict == CONTRADICTED
    close = ResultLookup(results([window_rows("a", base * 1.001), window_rows("b", base)]))
    assert evaluate_claim("approx(ppl(a, s), ppl(b, s), rel=0.02)", close).verdict == REPRODUCED
    assert evaluate_claim("approx(ppl(a, s), ppl(b, s), rel=0.02)", lookup).verdict == CONTRADICTED
    # unpaired, the window noise makes "within 2%" undecidable
    far = ResultLookup(results([window_rows("a", base * 1.001, seqlen=255), window_rows("b", base)]))
    assert evaluate_claim("approx(ppl(a, s), ppl(b, s), rel=0.02)", far).verdict == INCONCLUSIVE


def test_intervals_are_reproducible():
    base = _hard_windows()
    rows = [window_rows("a", base * 0.99), window_rows("b", base)]
    first = evaluate_claim("ppl(a, s) < ppl(b, s)", ResultLookup(results(rows))).comparisons
    again = evaluate_claim("ppl(a, s) < ppl(b, s)", ResultLookup(results(rows))).comparisons
    assert first == again


def example_rows(method, scores, seed=0, limit=200):
    """An lm-eval record with per-document scores (what lm-eval records store in info.example_scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    return {"method": method, "scheme": "s", "seed": seed, "task": "piqa", "metric": "acc", "value": scores.mean(),
            "info.example_scores.acc": json.dumps(scores.tolist()), "protocol.limit": limit,
            "protocol.num_fewshot": 0, "run_id": f"{method}-{seed}-{limit}"}


def test_accuracies_on_the_same_documents_are_compared_paired():
    """Method a fixes 6 of 200 documents b gets wrong and breaks none: +3 points, reproduced when paired
    (the same documents resampled for both), inconclusive from the two accuracies' binomial spread alone."""
    b = (np.random.default_rng(1).uniform(size=200) < 0.6).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:6]] = 1.0
    paired = ResultLookup(results([example_rows("a", a), example_rows("b", b)]))
    r = evaluate_claim("acc(a, s, task=piqa) > acc(b, s, task=piqa)", paired)
    assert r.verdict == REPRODUCED and r.comparisons[0]["paired"]
    other_docs = ResultLookup(results([example_rows("a", a, limit=199), example_rows("b", b)]))
    assert evaluate_claim("acc(a, s, task=piqa) > acc(b, s, task=piqa)", other_docs).verdict == INCONCLUSIVE


def test_intervals_do_not_depend_on_the_order_of_the_records():
    base = _hard_windows()
    rows = [window_rows("a", base * f, seed=i) for i, f in enumerate((0.95, 1.0, 1.05))] + [window_rows("b", base)]
    first = evaluate_claim("ppl(a, s) < ppl(b, s)", ResultLookup(results(rows))).comparisons
    again = evaluate_claim("ppl(a, s) < ppl(b, s)", ResultLookup(results(rows[::-1]))).comparisons
    assert first == again
