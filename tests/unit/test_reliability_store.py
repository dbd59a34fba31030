"""Reliability probe regressions for the result store and the CLI around it (toy world, in process)."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.cli import main  # noqa: E402
from harness.errors import PtqbenchError  # noqa: E402
from harness.store import Store, StoreWarning, load_results  # noqa: E402

SPEC = """
name: rel
models: [tiny-a]
methods: [fp, toy_rtn]
schemes: [w8]
tasks: [toy_ppl]
ppl: {seqlen: 16, max_windows: 1}
"""


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)
    monkeypatch.setenv("PTQBENCH_PROGRESS", "0")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("PTQBENCH_RESULTS_DIR", raising=False)


def record(run_id="abc123", **kw):
    return {"run_id": run_id, "status": "done", "model": "m", "method": "fp", "method_label": "fp",
            "scheme": "w8", "task": "t", "metrics": {"ppl": 1.0}, "main_metric": "ppl", **kw}


def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


def last_err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# defect 8 ----------------------------------------------------------------------------------
BAD_RECORDS = {"empty": b"", "truncated": b'{"run_id": "x", "sta', "list": b"[1, 2]", "number": b"3",
               "binary": b"\xff\xfe\x00", "no_status": b'{"a": 1}'}


@pytest.mark.parametrize("kind", [*BAD_RECORDS, "directory"])
def test_bad_record_is_skipped_and_moved_aside(tmp_path, kind):
    store = Store(tmp_path)
    store.write(record("good1"))
    bad = store.runs / "bad1.json"
    if kind == "directory":
        bad.mkdir()
    else:
        bad.write_bytes(BAD_RECORDS[kind])
    with pytest.warns(StoreWarning, match="bad1.json"):
        records = list(store.records())
    assert [r["run_id"] for r in records] == ["good1"]
    assert not bad.exists() and any((store.runs / ".bad").iterdir())
    assert store.get("bad1") is None
    assert len(load_results(tmp_path)) == 1


def test_bad_record_does_not_abort_get(tmp_path):
    store = Store(tmp_path)
    store.runs.mkdir(parents=True)
    (store.runs / "dead.json").write_text("{")
    with pytest.warns(StoreWarning):
        assert store.get("dead") is None and store.status("dead") is None


def test_bad_record_does_not_abort_run_dryrun_or_table(tmp_path, capsys):
    from harness.spec import load_spec

    spec, results = spec_file(tmp_path), tmp_path / "res"
    cells = load_spec(spec).cells()
    store = Store(results)
    ids = sorted(rid for c in cells for rid in c.run_ids.values())
    for rid in ids:
        store.write(record(rid, spec="rel"))
    store.path(ids[0]).write_text("")
    (results / "runs" / "zzzz.json").mkdir()
    capsys.readouterr()
    with pytest.warns(StoreWarning):
        assert main(["run", str(spec), "--results-dir", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{ids[0]}  todo" in out and f"{ids[1]}  skip" in out
    (results / "runs" / "yyyy.json").write_text("[]")
    with pytest.warns(StoreWarning, match="yyyy.json"):
        assert main(["table", "--results-dir", str(results)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert [r["run_id"] for r in Store(results).records()] == ids[1:]


# defect 12 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "proc", "runs_is_file", "readonly"])
def test_unusable_results_dir_fails_before_any_work(tmp_path, capsys, monkeypatch, kind):
    if kind == "file":
        target = tmp_path / "afile"
        target.write_text("x")
    elif kind == "proc":
        target = Path("/proc/ptqbench-results")
    elif kind == "runs_is_file":
        target = tmp_path / "res"
        target.mkdir()
        (target / "runs").write_text("x")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes read-only directories")
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    import harness.driver as driver

    def no_work(*a, **k):
        raise AssertionError("work started before the results directory was checked")

    monkeypatch.setattr(driver, "run_matrix", no_work)
    rc = main(["run", str(spec_file(tmp_path)), "--results-dir", str(target), "--no-track"])
    assert rc == 2
    line = last_err(capsys)
    assert line.startswith("ptqbench: error:") and "results directory" in line


def test_open_for_writing_is_one_line_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PtqbenchError):
        Store(tmp_path / "f").open_for_writing()


# defect 11 ---------------------------------------------------------------------------------
def test_stale_temporaries_are_cleaned_and_live_ones_kept(tmp_path):
    store = Store(tmp_path)
    store.runs.mkdir(parents=True)
    store.calib_cache.mkdir(parents=True)
    old_tmp = store.runs / ".abc.json.x1.tmp"
    live_tmp = store.runs / ".def.json.x2.tmp"
    old_dir = store.calib_cache / ".KEY1.abcd"
    live_dir = store.calib_cache / ".KEY2.efgh"
    for p in (old_tmp, live_tmp):
        p.write_text("{")
    for d in (old_dir, live_dir):
        d.mkdir()
        (d / "state.safetensors").write_bytes(b"xx")
    keep = store.calib_cache / "KEY0"
    keep.mkdir()
    past = time.time() - 3600
    for p in (old_tmp, old_dir):
        os.utime(p, (past, past))
    os.utime(keep, (past, past))
    Store(tmp_path).open_for_writing()
    assert not old_tmp.exists() and not old_dir.exists()
    assert live_tmp.exists() and live_dir.exists() and keep.exists()


def test_write_cleans_stale_temporaries(tmp_path):
    store = Store(tmp_path)
    store.runs.mkdir(parents=True)
    stale = store.runs / ".x.json.y.tmp"
    stale.write_text("")
    past = time.time() - 3600
    os.utime(stale, (past, past))
    Store(tmp_path).write(record())
    assert not stale.exists()


# defect 19 (store part) --------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../../x", "../escape", "/abs", "a/b", ".hidden", "", "..", "a..b", 5])
def test_store_refuses_unsafe_run_ids(tmp_path, run_id):
    store = Store(tmp_path / "res")
    with pytest.raises(PtqbenchError):
        store.write(record(run_id))
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "escape.json").exists()
    with pytest.raises(PtqbenchError):
        store.get(run_id) if isinstance(run_id, str) else store.path(run_id)


def test_show_refuses_traversal(tmp_path, capsys):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(record("outside")))
    results = tmp_path / "a" / "b"
    Store(results).write(record("inside1"))
    assert main(["show", "../../outside", "--results-dir", str(results)]) == 2
    assert "invalid run id" in last_err(capsys)


def test_calib_keys_are_checked(tmp_path):
    with pytest.raises(PtqbenchError):
        Store(tmp_path).calib_dir("../../x")


# defect 9 ----------------------------------------------------------------------------------
def _state():
    import torch

    from harness.state import State

    try:
        return State.from_tensors({"w": torch.arange(64.0).reshape(8, 8)}, {"a": 1})  # type: ignore[attr-defined]
    except AttributeError:
        pass
    from dataclasses import dataclass

    @dataclass
    class S(State):
        w: torch.Tensor
        a: int = 1

    return S(w=torch.arange(4096.0).reshape(64, 64))


@pytest.mark.parametrize("damage", ["truncate", "flip", "truncate_no_manifest"])
def test_damaged_calib_state_is_missing_and_recomputed(tmp_path, damage):
    store = Store(tmp_path)
    state = _state()
    d = store.save_calib("k1", state)
    assert (d / "manifest.json").exists() and store.has_calib("k1")
    f = d / "state.safetensors"
    data = f.read_bytes()
    if damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        f.write_bytes(data[: len(data) // 2])
    if damage == "truncate_no_manifest":
        (d / "manifest.json").unlink()
    fresh = Store(tmp_path)
    with pytest.warns(StoreWarning, match="damaged"):
        assert not fresh.has_calib("k1")
    assert not d.exists()
    fresh.save_calib("k1", state)  # the recompute replaces it
    assert fresh.has_calib("k1")
    assert type(fresh.load_calib("k1", type(state))) is type(state)


def test_state_without_manifest_still_loads(tmp_path):
    store = Store(tmp_path)
    d = store.save_calib("k2", _state())
    (d / "manifest.json").unlink()
    assert Store(tmp_path).has_calib("k2")


def test_site_into_unwritable_results_is_one_line(tmp_path, capsys):
    results = tmp_path / "res"
    Store(results).write(record("site1"))
    (results / "leaderboard").write_text("a file where a directory should be")
    assert main(["site", "--results-dir", str(results)]) == 2
    assert last_err(capsys).startswith("ptqbench: error:")
