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
