"""Result store: atomic JSON records, resume bookkeeping, tidy DataFrame, parquet, calibration cache."""
import json
import math
import os
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from harness.errors import PtqbenchError, UnknownNameError
from harness.method import State
from harness.store import Store, export_parquet, load_results, results_dir


def record(run_id, status="done", metrics=None, **extra):
    base = {"run_id": run_id, "status": status, "error": None if status == "done" else "RuntimeError: x",
            "model": "tiny-a", "method": "gptq", "method_label": "gptq", "method_params": {"damp": 0.01, "act_order": False},
            "scheme": "w4", "scheme_config": {"weight": {"bits": 4, "group": 128}}, "task": "wikitext2",
            "protocol": {"seqlen": 256, "max_windows": 4}, "calib": {"corpus": "c4", "n": 8, "seqlen": 256},
            "seed": 0, "metrics": {"ppl": 12.5, "calib_seconds": 3.0} if metrics is None else metrics,
            "timings": {"load_s": 1.0}, "versions": {"torch": "2.13.0"}, "spec": "toy", "created_at": "now"}
    base.update(extra)
    return base


def test_write_get_status(tmp_path):
    store = Store(tmp_path)
    path = store.write(record("abc"))
    assert path == tmp_path / "runs" / "abc.json"
    assert store.get("abc")["metrics"]["ppl"] == 12.5
    assert store.status("abc") == "done" and store.status("zzz") is None
    with pytest.raises(PtqbenchError):
        store.write({"run_id": "x", "status": "maybe"})


def test_results_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQBENCH_RESULTS_DIR", str(tmp_path / "r"))
    assert results_dir() == tmp_path / "r" and Store().runs == tmp_path / "r" / "runs"
    assert results_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_failed_write_leaves_old_record_and_no_temp(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write(record("abc", metrics={"ppl": 1.0}))

    def crash(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write(record("abc", metrics={"ppl": 2.0}))
    monkeypatch.undo()
    assert store.get("abc")["metrics"]["ppl"] == 1.0
    assert sorted(p.name for p in store.runs.iterdir()) == ["abc.json"]


def test_leftover_temp_files_are_ignored(tmp_path):
    store = Store(tmp_path)
    store.write(record("abc"))
    (store.runs / ".def.json.x1y2.tmp").write_text('{"run_id": "def", "stat')  # a kill -9 mid-write
    assert [r["run_id"] for r in store.records()] == ["abc"]
    assert set(load_results(tmp_path)["run_id"]) == {"abc"}


def test_nonfinite_metrics_stay_valid_json(tmp_path):
    store = Store(tmp_path)
    store.write(record("nan1", status="failed", metrics={"ppl": float("nan"), "kl": float("inf")}))
    json.loads((store.runs / "nan1.json").read_text())  # strict JSON parser accepts it
    df = load_results(tmp_path)
    values = dict(zip(df["metric"], df["value"]))
    assert math.isnan(values["ppl"]) and values["kl"] == math.inf


def test_tidy_frame_one_row_per_run_and_metric(tmp_path):
    store = Store(tmp_path)
    store.write(record("r1"))
    store.write(record("r2", metrics={"ppl": 20.0}, scheme="mxfp4", method_params={"damp": 0.1, "act_order": True}))
    store.write(record("r3", status="failed", metrics={}))
    df = load_results(tmp_path)
    assert len(df) == 2 + 1 + 1
    for col in ("run_id", "status", "error", "model", "method", "scheme", "task", "seed", "metric", "value",
                "method_params.damp", "method_params.act_order", "protocol.seqlen", "calib.n",
                "scheme_config.weight.bits", "versions.torch", "timings.load_s", "spec", "created_at"):
        assert col in df.columns, col
    r2 = df[(df.run_id == "r2") & (df.metric == "ppl")].iloc[0]
    assert r2.value == 20.0 and r2["method_params.damp"] == 0.1 and r2.scheme == "mxfp4"
    failed = df[df.run_id == "r3"]
    assert len(failed) == 1 and failed.iloc[0].status == "failed" and pd.isna(failed.iloc[0].metric)


def test_export_parquet_round_trip(tmp_path):
    store = Store(tmp_path)
    store.write(record("r1"))
    store.write(record("r2", status="failed", metrics={}, seed=None))
    out = export_parquet(tmp_path / "out" / "results.parquet", tmp_path)
    back = pd.read_parquet(out)
    assert len(back) == 3 and set(back.run_id) == {"r1", "r2"}
    assert back[back.metric == "ppl"].value.iloc[0] == 12.5


def test_find_by_prefix(tmp_path):
    store = Store(tmp_path)
    store.write(record("abc123"))
    store.write(record("abd456"))
    assert store.find("abc")["run_id"] == "abc123"
    with pytest.raises(PtqbenchError, match="ambiguous"):
        store.find("ab")
    with pytest.raises(UnknownNameError, match="'zz'"):
        store.find("zz")


@dataclass(kw_only=True)
class _WState(State):
    w: torch.Tensor


def test_calibration_cache(tmp_path):
    store = Store(tmp_path)
    assert not store.has_calib("k1")
    store.save_calib("k1", _WState(w=torch.ones(2, 2), meta={"a": 1}))
    assert store.has_calib("k1")
    loaded = store.load_calib("k1", _WState)
    assert loaded.meta == {"a": 1} and torch.equal(loaded.w, torch.ones(2, 2))
    store.save_calib("k1", _WState(w=torch.ones(2, 2), meta={"a": 1}))  # a second writer: no error
    assert [p.name for p in store.calib_cache.iterdir()] == ["k1"]
