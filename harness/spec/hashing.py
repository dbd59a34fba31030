"""Content hashes: every run is named by what changes its number, so a rerun finds its record.

`run_key` holds everything that moves one (cell, task) number; `calib_key` leaves the task out (and
keeps only the scheme part the method's calibration reads), so adding a task never recalibrates.
"""
from __future__ import annotations

import functools
import hashlib
import json
from typing import TYPE_CHECKING, Any

from harness.spec.code import calib_code_hash, method_code_hash
from harness.spec.schema import DEFAULT_THREADS

if TYPE_CHECKING:
    from harness.spec.cells import Cell, TaskSpec


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canon(obj).encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=None)
def library_versions() -> dict[str, str]:
    from importlib import metadata

    import harness

    out = {"ptqbench": harness.__version__}
    for dist in ("torch", "transformers", "lm-eval"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def versions_for(task_kind: str | None) -> dict[str, str]:
    """Library versions that can move a number of this kind (lm-eval only for lm-eval tasks)."""
    v = library_versions()
    keep = ["ptqbench", "torch", "transformers"] + (["lm-eval"] if task_kind == "lm_eval" else [])
    return {k: v[k] for k in keep}


def _model_identity(cell: Cell) -> dict[str, Any]:
    identity = {"model": cell.model, "revision": cell.revision, "source": cell.model_source,
                "dtype": cell.dtype, "device": cell.device}
    if cell.threads != DEFAULT_THREADS:  # the default is left out: run ids from before `threads` stay valid
        identity["threads"] = cell.threads
    return identity


def calib_key(cell: Cell, calib_scheme: Any) -> str:
    """Cache key of a cell's calibration state: no task, and only the scheme part the method uses."""
    return content_hash({
        "kind": "calib", **_model_identity(cell), "method": cell.method, "params": cell.method_params,
        "method_version": cell.method_version, "code": calib_code_hash(cell.method_module), "calib": cell.calib, "seed": cell.seed,
        "scheme": calib_scheme, "versions": versions_for(None),
    }, 20)


def run_key(cell: Cell, task: TaskSpec) -> dict[str, Any]:
    """Everything that changes the number of one (cell, task) run."""
    return {
        "kind": "run", **_model_identity(cell), "method": cell.method, "params": cell.method_params,
        "method_version": cell.method_version, "code": method_code_hash(cell.method_module), "scheme": cell.scheme_config, "calib": cell.calib,
        "seed": cell.seed, "task": task.name, "task_kind": task.kind, "protocol": task.protocol,
        "versions": versions_for(task.kind),
    }


def run_id(cell: Cell, task: TaskSpec) -> str:
    return content_hash(run_key(cell, task))


def run_identity(cell: Cell, task: TaskSpec) -> str:
    """The run key without the code hash: records of one run under two versions of the code share it
    (harness.fingerprint decides whether the older one still holds)."""
    key = run_key(cell, task)
    key.pop("code")
    return content_hash(key)
