"""Reliability probe regression: a method's sys.exit() is a failed run, not the end of the matrix (defect 13)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.driver import run_matrix  # noqa: E402
from harness.registry import get_method  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.store import Store  # noqa: E402

SPEC = """
name: toyexit
models: [tiny-a]
methods: [fp, toy_raise, toy_rtn]
schemes: [w4]
tasks: [toy_ppl]
ppl: {seqlen: 32, max_windows: 2}
calib: {n: 2, seqlen: 16}
"""


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)
    import harness.runner as runner

    # the toy schemes are not registry QuantSchemes: hand calibration the cell's own scheme
    monkeypatch.setattr(runner, "calib_scheme", lambda cell: cell.scheme)


def run(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    store = Store(tmp_path / "res")
    return run_matrix(load_spec(path).cells(), store), store


@pytest.mark.parametrize("stage", ["calibrate", "apply"])
@pytest.mark.parametrize("code", [0, 3, "bye"])
def test_method_sys_exit_is_a_failed_run(tmp_path, monkeypatch, stage, code):
    cls = get_method("toy_raise")

    def exits(self, *args, **kwargs):
        sys.exit(code)

    monkeypatch.setattr(cls, stage, exits)
    if stage == "apply":  # get past calibration
        monkeypatch.setattr(cls, "calibrate", get_method("toy_rtn").calibrate)
        monkeypatch.setattr(cls, "needs_calibration", False, raising=False)
    summary, store = run(tmp_path)
    recs = {r["method_label"]: r for r in store.records()}
    assert set(recs) == {"fp", "toy_raise", "toy_rtn"} and summary.total == 3
    assert recs["toy_raise"]["status"] == "failed"
    assert "SystemExit" in recs["toy_raise"]["error"] and repr(code) in recs["toy_raise"]["error"]


def test_keyboard_interrupt_still_stops_the_matrix(tmp_path, monkeypatch):
    cls = get_method("toy_raise")

    def interrupt(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, "calibrate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    labels = {r["method_label"] for r in Store(tmp_path / "res").records()}
    assert labels == {"fp"}  # what finished stays recorded; nothing after the interrupt ran


def test_a_cell_computes_with_its_own_thread_count_whatever_the_process_has(tmp_path, monkeypatch):
    """(#11.2) CPU numbers depend on torch's thread count (a blocked Cholesky sums in another order): Ray's
    1-CPU workers gave other values than a local run under one run id. Every cell now runs with
    `cell.threads`, recorded in its protocol, and the process's own count is restored."""
    import torch

    seen = []
    cls = get_method("toy_rtn")
    calibrate = cls.calibrate

    def spy(self, ctx):
        seen.append(torch.get_num_threads())
        return calibrate(self, ctx)

    monkeypatch.setattr(cls, "calibrate", spy)
    previous = torch.get_num_threads()
    try:
        for ambient in (1, 3):
            torch.set_num_threads(ambient)
            (tmp_path / str(ambient)).mkdir()
            summary, store = run(tmp_path / str(ambient))
            assert torch.get_num_threads() == ambient  # restored after the matrix
            assert summary.failed == 1  # toy_raise
            assert {r["protocol"]["threads"] for r in store.records()} == {2}
    finally:
        torch.set_num_threads(previous)
    assert seen == [2, 2]


def test_threads_is_hashed_only_when_it_is_not_the_default(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    default = load_spec(path).cells()
    path.write_text(SPEC + "threads: 2\n")
    explicit = load_spec(path).cells()
    path.write_text(SPEC + "threads: 1\n")
    one = load_spec(path).cells()
    assert [c.run_ids for c in default] == [c.run_ids for c in explicit]  # run ids from before `threads` stay
    assert all(a.run_ids != b.run_ids for a, b in zip(default, one)) and one[0].threads == 1


@pytest.mark.parametrize("bad", ["0", "-2", "two", "true", "1.5"])
def test_a_bad_thread_count_is_a_one_line_spec_error(tmp_path, bad):
    from harness.spec import SpecError

    path = tmp_path / "spec.yaml"
    path.write_text(SPEC + f"threads: {bad}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path).cells()
    assert "threads" in str(err.value) and "\n" not in str(err.value)
