from __future__ import annotations

import json

import pandas as pd

from harness import tracking


def test_flatten_drops_credentials():
    flat = tracking.flatten({"a": {"b": 1, "api_key": "x", "hf_token": "y"}, "c": [1, 2]})
    assert flat == {"a.b": 1, "c": "[1, 2]"}


def test_offline_runs_written_to_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    record = {"run_id": "abc", "status": "done", "model": "tiny", "method": "rtn", "scheme": "mxfp4",
              "task": "wikitext2", "metrics": {"ppl": 12.5, "calib_seconds": 0.1}, "protocol": {"seqlen": 64},
              "spec": "smoke", "secret_token": "must-not-appear"}
    path = tracking.log_record(record, project="ptqbench-test", directory=tmp_path)
    assert path and path.startswith("ptqbench-test/")
    df = pd.DataFrame([{"run_id": "abc", "model": "tiny", "method": "rtn", "scheme": "mxfp4", "task": "wikitext2",
                        "seed": 0, "status": "done", "metric": "ppl", "value": 12.5}])
    assert tracking.log_summary(df, project="ptqbench-test", group="smoke", directory=tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    # the record's run (directory names start with a one-second timestamp, so sorting cannot tell them apart)
    (run,) = [r for r in runs if r.name.endswith("-" + path.split("/")[-1])]
    blob = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert b"must-not-appear" not in blob
    assert b"protocol.seqlen" in blob and b"ppl" in blob  # config and summary in the offline run file
    table = json.loads(next(run.rglob("metrics_table*.table.json")).read_text())
    assert ["wikitext2", "ppl", 12.5] in table["data"]


def test_disabled_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.log_record({"run_id": "x", "status": "done", "metrics": {}}, directory=tmp_path) is None
    assert not (tmp_path / "wandb").exists()
