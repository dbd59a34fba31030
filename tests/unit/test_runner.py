"""Runner: failures become records, calibration is cached, reruns resume, numbers are deterministic.

Runs the real engine (spec -> runner -> store) on tiny Llama models with the toy schemes, tasks and
evaluators of tests/fixtures/engine_fakes.py and the toy methods of the test plugin package.
"""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.driver import run_matrix  # noqa: E402
from harness.executors.local import LocalExecutor  # noqa: E402
from harness.runner import DIVERGED_PPL, RunFailure, check_result  # noqa: E402
from harness.spec import TaskSpec, load_spec  # noqa: E402
from harness.store import Store  # noqa: E402


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)


SPEC = """
name: toy
models: [tiny-a]
methods: [fp, toy_rtn, toy_raise, {name: toy_calib, label: toy_calib, params: {counter_file: COUNTER}}]
schemes: [w4, nan_scheme]
tasks: [toy_ppl, toy_acc, kl]
ppl: {seqlen: 32, max_windows: 2}
calib: {n: 2, seqlen: 16}
"""


def run(tmp_path, text, results="res", name="spec.yaml", **kw):
    path = tmp_path / name
    path.write_text(text.replace("COUNTER", str(tmp_path / "calls.txt")))
    cells = load_spec(path).cells()
    store = Store(tmp_path / results)
    return run_matrix(cells, store, **kw), store


def by_key(store):
    return {(r["method_label"], r["scheme"], r["task"]): r for r in store.records()}


def calibrations(tmp_path):
    f = tmp_path / "calls.txt"
    return len(f.read_text().splitlines()) if f.exists() else 0


def test_failures_are_recorded_and_the_matrix_goes_on(tmp_path):
    summary, store = run(tmp_path, SPEC)
    recs = by_key(store)
    # fp: 1 cell; toy_rtn, toy_raise, toy_calib: 2 schemes each; 3 tasks per cell
    assert len(recs) == summary.total == 3 * (1 + 2 + 2 + 2)
    for task in ("toy_ppl", "toy_acc", "kl"):
        for scheme in ("w4", "nan_scheme"):
            err = recs[("toy_raise", scheme, task)]
            assert err["status"] == "failed"
            assert err["error"] == "[calibrate] RuntimeError: toy calibration exploded on two lines"
        for method in ("toy_rtn", "toy_calib"):
            bad = recs[(method, "nan_scheme", task)]
            assert bad["status"] == "failed" and "non-finite logits" in bad["error"]
            good = recs[(method, "w4", task)]
            assert good["status"] == "done" and good["error"] is None
            assert all(math.isfinite(v) for v in good["metrics"].values())
        assert recs[("fp", "w16a16", task)]["status"] == "done"
    assert summary.done == 3 * (1 + 1 + 1) and summary.failed == summary.total - summary.done
    # the FP model is its own KL reference; a quantized one is not
    assert recs[("fp", "w16a16", "kl")]["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert recs[("toy_rtn", "w4", "kl")]["metrics"]["kl"] > 1e-6
    assert recs[("toy_rtn", "w4", "toy_ppl")]["main_metric"] == "ppl"


def test_records_carry_costs_and_config(tmp_path):
    _, store = run(tmp_path, SPEC)
    rec = by_key(store)[("toy_calib", "w4", "toy_ppl")]
    m = rec["metrics"]
    assert m["calib_seconds"] >= 0 and m["calib_peak_mb"] > 0 and m["calib_cached"] == 0.0
    assert m["calib_extra_mb"] >= 0 and m["calib_steps"] == 14.0  # steps as the method counts them
    assert m["method.n_layers"] == 14.0  # 2 layers x 7 linears
    assert {"load_s", "calibrate_s", "apply_s", "eval_s", "process_peak_rss_mb"} <= set(rec["timings"])
    assert rec["protocol"]["seqlen"] == 32 and rec["protocol"]["windows"] == 2  # requested + reported
    assert rec["calib"] == {"corpus": "c4", "n": 2, "seqlen": 16} and rec["seed"] == 0
    assert rec["scheme_config"] == {"name": "w4", "bits": 4, "nan": False}
    for field in ("run_id", "status", "error", "model", "method", "method_params", "scheme", "task", "metrics",
                  "protocol", "timings", "versions", "spec", "created_at"):
        assert field in rec


def test_calibration_is_cached_across_specs(tmp_path):
    run(tmp_path, SPEC)
    # nan_scheme has the same weight bits as w4, so toy_calib calibrated once for both
    assert calibrations(tmp_path) == 1
    # a second spec that only adds a task runs just the new task and never recalibrates
    summary, store = run(tmp_path, SPEC.replace("kl]", "kl, toy_ppl2]"), name="more.yaml", retry_failed=False)
    assert calibrations(tmp_path) == 1
    assert summary.done + summary.failed == 7 and summary.skipped == 21
    new = by_key(store)[("toy_calib", "w4", "toy_ppl2")]
    old = by_key(store)[("toy_calib", "w4", "toy_ppl")]
    assert new["metrics"]["calib_cached"] == 1.0
    assert new["metrics"]["calib_seconds"] == old["metrics"]["calib_seconds"]


def test_cached_state_gives_the_same_numbers(tmp_path):
    _, first = run(tmp_path, SPEC, results="a")
    cache = first.calib_cache
    second = Store(tmp_path / "b")
    second.calib_cache.parent.mkdir(parents=True)
    cache.rename(second.calib_cache)  # b starts with a's calibration cache
    run(tmp_path, SPEC, results="b")
    assert calibrations(tmp_path) == 1
    a, b = by_key(first), by_key(second)
    assert a[("toy_calib", "w4", "toy_ppl")]["metrics"]["ppl"] == b[("toy_calib", "w4", "toy_ppl")]["metrics"]["ppl"]


def test_two_runs_give_identical_numbers(tmp_path):
    text = SPEC.replace("{name: toy_calib, label: toy_calib, params: {counter_file: COUNTER}}", "toy_calib") + "seeds: [0, 1]\n"
    _, a = run(tmp_path, text, results="a")
    _, b = run(tmp_path, text, results="b")
    ra, rb = {r["run_id"]: r for r in a.records()}, {r["run_id"]: r for r in b.records()}
    assert ra.keys() == rb.keys()
    for rid, rec in ra.items():
        if rec["status"] == "done":
            assert rec["metrics"]["kl" if rec["task"] == "kl" else ("acc" if rec["task"] == "toy_acc" else "ppl")] == \
                rb[rid]["metrics"]["kl" if rec["task"] == "kl" else ("acc" if rec["task"] == "toy_acc" else "ppl")]
    # and the seed matters for a method that draws random numbers
    s0 = next(r for r in ra.values() if r["method"] == "toy_calib" and r["seed"] == 0 and r["task"] == "toy_ppl" and r["scheme"] == "w4")
    s1 = next(r for r in ra.values() if r["method"] == "toy_calib" and r["seed"] == 1 and r["task"] == "toy_ppl" and r["scheme"] == "w4")
    assert s0["metrics"]["ppl"] != s1["metrics"]["ppl"]


def test_resume_skips_done_and_retries_failed(tmp_path):
    first, store = run(tmp_path, SPEC)
    again, _ = run(tmp_path, SPEC, retry_failed=False)
    assert again.done == again.failed == 0 and again.skipped == first.total
    retry, _ = run(tmp_path, SPEC)  # default: failed runs are retried, done ones skipped
    assert retry.done == 0 and retry.failed == first.failed and retry.skipped == first.done
    victim = by_key(store)[("toy_rtn", "w4", "toy_acc")]["run_id"]
    store.path(victim).unlink()
    redo, _ = run(tmp_path, SPEC, retry_failed=False)
    assert redo.done == 1 and redo.skipped == first.total - 1
    assert len(list(store.records())) == first.total


def test_one_failing_task_does_not_fail_its_siblings(tmp_path):
    def broken_acc(*args):
        raise ValueError("lm-eval fell over")

    text = "models: [tiny-a]\nmethods: [toy_rtn]\nschemes: [w4]\ntasks: [toy_ppl, toy_acc]\nppl: {seqlen: 16}\n"
    path = tmp_path / "s.yaml"
    path.write_text(text)
    store = Store(tmp_path / "res")
    summary = run_matrix(load_spec(path).cells(), store, LocalExecutor(evaluators={"lm_eval": broken_acc}))
    recs = {r["task"]: r for r in store.records()}
    assert recs["toy_ppl"]["status"] == "done"
    assert recs["toy_acc"]["status"] == "failed" and recs["toy_acc"]["error"] == "[eval] ValueError: lm-eval fell over"
    assert summary.failed == 1 and summary.errors == 1


@pytest.mark.parametrize("value, ok", [(12.0, True), (DIVERGED_PPL * 2, False), (float("nan"), False), (float("inf"), False)])
def test_diverged_or_nonfinite_ppl_fails(value, ok):
    task = TaskSpec("wikitext2", "ppl", {"seqlen": 8, "max_windows": 1})
    if ok:
        check_result(task, {"ppl": value})
    else:
        with pytest.raises(RunFailure, match="diverged|non-finite"):
            check_result(task, {"ppl": value})


def test_diverged_ppl_becomes_a_failed_record(tmp_path):
    from engine_fakes import ToyResult

    def exploding(model, tokenizer, tasks, cell, refs):
        return {t.name: ToyResult(3.0e6, "ppl", {}, {}) for t in tasks}

    path = tmp_path / "s.yaml"
    path.write_text("models: [tiny-a]\nmethods: [fp]\nschemes: [w4]\ntasks: [toy_ppl]\n")
    store = Store(tmp_path / "res")
    summary = run_matrix(load_spec(path).cells(), store, LocalExecutor(evaluators={"ppl": exploding}))
    (rec,) = store.records()
    assert rec["status"] == "failed" and rec["error"].startswith("[eval] RunFailure: diverged: ppl=3e+06")
    assert rec["metrics"]["ppl"] == 3.0e6  # the offending number is kept for inspection
    assert (summary.failed, summary.diverged, summary.errors) == (1, 1, 0)
    # a measured outcome: the rerun does not retry it (another failure would be retried)
    again = run_matrix(load_spec(path).cells(), store, LocalExecutor(evaluators={"ppl": exploding}))
    assert (again.skipped, again.failed) == (1, 0)


def test_reusing_the_loaded_model_changes_no_number(tmp_path):
    calls = []

    def counting_loader(cell):
        calls.append(cell.model)
        return engine_fakes.load(cell)

    text = SPEC.replace("models: [tiny-a]", "models: [tiny-a, tiny-b]")
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("COUNTER", str(tmp_path / "calls.txt")))
    cells = load_spec(path).cells()
    fresh, reused = Store(tmp_path / "fresh"), Store(tmp_path / "reused")
    run_matrix(cells, fresh, LocalExecutor(model_loader=counting_loader, reuse_models=False))
    assert len(calls) == len(cells)
    calls.clear()
    run_matrix(cells, reused, LocalExecutor(model_loader=counting_loader))
    assert calls == ["tiny-a", "tiny-b"]  # each model loaded once; cells got copies (quantized in place)
    a, b = ({r["run_id"]: r["metrics"] for r in s.records()} for s in (fresh, reused))
    assert a.keys() == b.keys()
    for rid in a:
        assert {k: v for k, v in a[rid].items() if "calib_" not in k} == \
            {k: v for k, v in b[rid].items() if "calib_" not in k}


def test_a_failed_reference_fails_only_the_tasks_that_need_it(tmp_path, monkeypatch):
    import harness.runner as runner

    def no_reference(model, tokenizer, task, cell=None):
        raise FileNotFoundError("reference data missing")

    monkeypatch.setattr(runner, "REFERENCE_COLLECTORS", {"kl": no_reference})
    path = tmp_path / "s.yaml"
    path.write_text("models: [tiny-a]\nmethods: [toy_rtn]\nschemes: [w4]\ntasks: [toy_ppl, kl]\nppl: {seqlen: 16}\n")
    store = Store(tmp_path / "res")
    run_matrix(load_spec(path).cells(), store)
    recs = {r["task"]: r for r in store.records()}
    assert recs["toy_ppl"]["status"] == "done"
    assert recs["kl"]["error"] == "[reference] FileNotFoundError: reference data missing"
