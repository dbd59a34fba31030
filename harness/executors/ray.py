"""The `ray` executor: one Ray task per cell, each in a worker process, GPUs as resources.

`ray.init()` starts a local cluster on this machine by default; `RAY_ADDRESS` (or `--address`) joins an
existing cluster for multi-node runs. Workers return their records to the driver, which alone writes the
store and W&B, so workers need no shared filesystem (only the calibration cache is per node then).

Offline by construction: usage stats off, no dashboard, token auth off, and Ray's cloud-metadata probe
is avoided by starting Ray with HOME pointing at a folder whose `ray_bootstrap_config.yaml` says
`provider: {type: local}` (see research/stack.md §5).

Scheduling rules:
- A cell asks for `num_gpus` from the model size (parsed from its name, e.g. "Qwen3-32B" -> 2) when the
  cluster has GPUs, or for what the spec's `resources` say; 0 on a CPU-only cluster.
- Cells that share a calibration (same model, method, params, calib data, seed; different schemes or
  tasks) run one after another, the first one filling the calibration cache for the rest.
- A worker that dies (crash, kill, OOM) is retried up to `max_retries` times; after that its cell's
  runs are recorded as failed with the reason.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.executors import Executor, register_executor
from harness.runner import base_record, one_line_error, run_cell
from harness.store import FAILED

# model parameters (billions) -> GPUs of ~80 GB for fake-quant evaluation in bf16 with headroom
GPU_RULE = ((10, 1), (40, 2), (80, 4), (float("inf"), 8))
_SIZE = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")  # "32B", "8x7B" (MoE: all experts)


def gpus_for_model(model: str, cluster_gpus: float) -> float:
    """GPUs one cell of this model asks for (0 without GPUs; unknown sizes get 1)."""
    if cluster_gpus <= 0:
        return 0
    match = _SIZE.search(model.split("/")[-1])
    if not match:
        return 1
    billions = float(match.group(2)) * int(match.group(1) or 1)
    needed = next(g for limit, g in GPU_RULE if billions <= limit)
    return min(needed, cluster_gpus)


def ray_home() -> str:
    """A HOME for Ray holding the bootstrap config that stops its cloud-metadata probe."""
    home = Path(tempfile.gettempdir()) / "ptqbench-ray-home"
    home.mkdir(exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    return str(home)


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Start (or join) Ray with the offline settings; returns the ray module."""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    saved_home = os.environ.get("HOME")
    os.environ["HOME"] = ray_home()  # read by the processes Ray starts now
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    finally:
        if saved_home is not None:
            os.environ["HOME"] = saved_home
    return ray


def _run_cell_remote(cell, store_root: str) -> list[dict[str, Any]]:
    import harness  # noqa: F401  (offline defaults inside the worker)

    return list(run_cell(cell, store_root))


@register_executor("ray")
class RayExecutor(Executor):
    """One Ray task per cell; see the module docstring for the rules."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_cell: float = 1,
                 max_retries: int = 2, resources: dict[str, Any] | None = None):
        self.address, self.num_cpus = address, num_cpus
        self.cpus_per_cell, self.max_retries = cpus_per_cell, max_retries
        self.resources = resources or {}

    def _options(self, cell, cluster_gpus: float) -> dict[str, Any]:
        wanted = {**self.resources, **getattr(cell, "resources", {})}  # the spec's request wins
        gpus = wanted.get("num_gpus")
        if gpus is None:
            gpus = gpus_for_model(cell.model, cluster_gpus)
        return {"num_cpus": wanted.get("num_cpus", self.cpus_per_cell), "num_gpus": gpus,
                "max_retries": self.max_retries, "retry_exceptions": False}

    def run(self, cells, store_root) -> Iterator[dict[str, Any]]:
        ray = init_ray(self.address, self.num_cpus)
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        # max_calls=1: a fresh worker process per cell, so nothing leaks from one model to the next
        remote = ray.remote(max_calls=1)(_run_cell_remote)
        # cells sharing a calibration run in sequence: the first fills the cache for the others
        chains: dict[str, list] = defaultdict(list)
        for cell in cells:
            chains[cell.calib_key or cell.describe()].append(cell)
        pending: dict[Any, tuple[str, Any]] = {}

        def submit(key: str) -> None:
            cell = chains[key].pop(0)
            ref = remote.options(**self._options(cell, cluster_gpus)).remote(cell, str(store_root))
            pending[ref] = (key, cell)

        for key in list(chains):
            submit(key)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key, cell = pending.pop(ready[0])
            try:
                records = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - worker died past its retries, OOM, ...
                reason = f"[worker] {one_line_error(exc)}"
                now = datetime.now(timezone.utc).isoformat(timespec="seconds")
                records = [{**base_record(cell, task), "status": FAILED, "error": reason, "metrics": {},
                            "timings": {}, "main_metric": None, "created_at": now} for task in cell.tasks]
            for record in records:
                record.setdefault("executor", "ray")
                yield record
            if chains[key]:
                submit(key)
