"""Weights & Biases tracking: one W&B run per result record, plus a matrix-level summary run.

Offline by default (`import harness` sets WANDB_MODE=offline unless the user set it), so no account is
needed; `wandb sync <dir>/wandb/offline-run-*` uploads later. WANDB_MODE=disabled turns tracking off.
Only the record is logged (config = the flattened cell, summary = its metrics); anything whose key
looks like a credential is dropped, and the environment is never logged.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|credential)", re.IGNORECASE)


def enabled() -> bool:
    return os.environ.get("WANDB_MODE", "offline") != "disabled"


def flatten(value: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested dicts to dotted keys; credential-looking keys are dropped."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, sub in value.items():
            if SECRET_KEY.search(str(key)):
                continue
            flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value, default=str)
    else:
        out[prefix] = value
    return out


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _init(**kwargs):
    import wandb

    settings = wandb.Settings(silent=True, x_disable_stats=True, console="off")
    return wandb.init(settings=settings, reinit="create_new", **kwargs)


def log_record(record: dict[str, Any], project: str = "ptqbench", group: str | None = None,
               directory: str | os.PathLike = "results") -> str | None:
    """Log one finished (or failed) run; returns the W&B run path (offline id) or None if disabled."""
    if not enabled():
        return None
    config = flatten({k: v for k, v in record.items() if k not in ("metrics",)})
    Path(directory).mkdir(parents=True, exist_ok=True)
    run = _init(project=project, group=group or record.get("spec"), name=_run_name(record), config=config,
                dir=str(directory), job_type=record.get("task") or "eval", tags=[record.get("status", "done")])
    try:
        metrics = _numeric(record.get("metrics") or {})
        run.summary.update(metrics)
        run.summary["status"] = record.get("status")
        if record.get("error"):
            run.summary["error"] = str(record["error"])[:500]
        if metrics:
            import wandb

            table = wandb.Table(columns=["task", "metric", "value"],
                                data=[[record.get("task"), k, v] for k, v in sorted(metrics.items())])
            run.log({"metrics_table": table})
        return f"{run.project}/{run.id}"
    finally:
        run.finish()


def log_summary(df, project: str = "ptqbench", group: str | None = None,
                directory: str | os.PathLike = "results") -> str | None:
    """A matrix-level run holding the whole tidy results table (leaderboard source)."""
    if not enabled() or df is None or df.empty:
        return None
    import wandb

    Path(directory).mkdir(parents=True, exist_ok=True)
    run = _init(project=project, group=group, name=f"{group or 'matrix'}-summary", job_type="summary", dir=str(directory))
    try:
        cols = [c for c in ("model", "method", "scheme", "task", "seed", "status", "metric", "value") if c in df.columns]
        table = wandb.Table(dataframe=df[cols].astype({c: str for c in cols if c != "value"}))
        run.log({"results": table})
        run.summary["runs"] = int(df["run_id"].nunique()) if "run_id" in df.columns else len(df)
        return f"{run.project}/{run.id}"
    finally:
        run.finish()


def _run_name(record: dict[str, Any]) -> str:
    parts = [record.get("model"), record.get("method_label") or record.get("method"), record.get("scheme"), record.get("task")]
    return "/".join(str(p) for p in parts if p) or record.get("run_id", "run")
