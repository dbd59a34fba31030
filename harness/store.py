"""Result store: one JSON record per run under `<results>/runs/<run_id>.json`, written atomically.

The results directory is, in order: an explicit argument, `$PTQBENCH_RESULTS_DIR`, `./results`.
A record is written to a hidden temporary file in the same directory, fsynced, then renamed over the
final name (`os.replace` is atomic on POSIX), so a crash leaves either the old record or the new one,
never half a file. Calibration states are cached under `<results>/cache/calib/<key>/`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.errors import PtqbenchError, UnknownNameError

DONE, FAILED = "done", "failed"
#: The error text of a run whose perplexity was measured but diverged (written by harness.runner.check_result).
DIVERGED_MARK = "RunFailure: diverged:"


def is_diverged(record: dict[str, Any] | None) -> bool:
    """A failed run whose number was measured but is above the divergence limit: a deterministic outcome (the
    value stays in its metrics), so it is not retried, is not an error exit, and still counts in claims."""
    return bool(record) and record.get("status") == FAILED and DIVERGED_MARK in str(record.get("error"))
# Record fields that hold nested config: flattened into dotted columns by `load_results`.
_NESTED = ("method_params", "scheme_config", "protocol", "calib", "timings", "versions", "model_source", "info")


def results_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("PTQBENCH_RESULTS_DIR") or "results")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _json_safe(obj: Any) -> Any:
    """NaN/Inf are not JSON: store them as strings so the file stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class Store:
    """The runs directory plus the calibration cache of one results directory."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = results_dir(root)
        self.runs = self.root / "runs"
        self.calib_cache = self.root / "cache" / "calib"

    # --- records -------------------------------------------------------------------------------
    def path(self, run_id: str) -> Path:
        return self.runs / f"{run_id}.json"

    def write(self, record: dict[str, Any]) -> Path:
        if "run_id" not in record or record.get("status") not in (DONE, FAILED):
            raise PtqbenchError(f"record needs a run_id and status done|failed, got {sorted(record)}")
        self.runs.mkdir(parents=True, exist_ok=True)
        path = self.path(record["run_id"])
        _atomic_write_text(path, json.dumps(_json_safe(record), sort_keys=True, indent=1, default=str) + "\n")
        return path

    def get(self, run_id: str) -> dict[str, Any] | None:
        path = self.path(run_id)
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def status(self, run_id: str) -> str | None:
        record = self.get(run_id)
        return None if record is None else record.get("status")

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.runs.is_dir():
            return
        for path in sorted(self.runs.glob("*.json")):
            if path.name.startswith("."):
                continue  # a temporary file left by a crash
            yield json.loads(path.read_text())

    def find(self, prefix: str) -> dict[str, Any]:
        """The record whose run id starts with `prefix` (unique)."""
        matches = sorted(p.stem for p in self.runs.glob(f"{prefix}*.json") if not p.name.startswith("."))
        if len(matches) == 1:
            return self.get(matches[0])  # type: ignore[return-value]
        if not matches:
            known = [p.stem for p in self.runs.glob("*.json")] if self.runs.is_dir() else []
            raise UnknownNameError(f"run id in {self.runs}", prefix, known[:20] or ["(no runs)"])
        raise PtqbenchError(f"run id prefix {prefix!r} is ambiguous: {', '.join(matches[:10])}")

    # --- calibration cache ---------------------------------------------------------------------
    def calib_dir(self, key: str) -> Path:
        return self.calib_cache / key

    def has_calib(self, key: str) -> bool:
        d = self.calib_dir(key)
        return (d / "state.safetensors").exists() and (d / "state.json").exists()

    def save_calib(self, key: str, state) -> Path:
        """Save a `State` under the key: written to a temporary directory, then renamed into place."""
        final = self.calib_dir(key)
        self.calib_cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.calib_cache, prefix=f".{key}."))
        try:
            state.save(tmp)
            if final.exists():  # a concurrent writer got there first: identical content by construction
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def load_calib(self, key: str, state_type: type | None = None, device: str = "cpu"):
        """The State saved under the key, rebuilt as `state_type` (a harness.state.State subclass)."""
        from harness.state import State

        return (state_type or State).load(self.calib_dir(key), device=device)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_results(path: str | os.PathLike | None = None):
    """Tidy DataFrame: one row per run x metric; every config field is a column.

    Nested config (method_params, scheme_config, protocol, calib, timings, versions, model_source,
    info) becomes dotted
    columns such as `method_params.damp` or `protocol.seqlen`. A failed run gives one row with
    metric NaN and its `error`, so failures stay visible in every table.
    """
    import pandas as pd

    rows = []
    for record in Store(path).records():
        base: dict[str, Any] = {}
        for key, value in record.items():
            if key == "metrics":
                continue
            if key in _NESTED and isinstance(value, dict):
                _flatten(key, value, base)
            elif isinstance(value, (dict, list)):
                base[key] = json.dumps(value, sort_keys=True)
            else:
                base[key] = value
        base["method_params_json"] = json.dumps(record.get("method_params") or {}, sort_keys=True)
        metrics = record.get("metrics") or {}
        if not metrics:
            rows.append({**base, "metric": None, "value": math.nan})
        for name, value in metrics.items():
            rows.append({**base, "metric": name, "value": _to_float(value)})
    return pd.DataFrame(rows)


def export_parquet(out: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write `load_results(path)` to a parquet file (mixed-type columns are stored as strings)."""
    df = load_results(path)
    for col in df.columns:
        if df[col].dtype == object:
            kinds = {type(v) for v in df[col].dropna()}
            if len(kinds) > 1:
                df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out, index=False)
    return out
