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

import atexit
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import PtqbenchError
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


_RAY_HOME: str | None = None


def ray_home() -> str:
    """A private HOME for Ray holding the bootstrap config that stops its cloud-metadata probe.

    A fresh 0700 directory per process (`mkdtemp` creates it atomically and never follows a link), removed at
    exit: a fixed path under the shared temp dir let anyone plant a symlink there and have its target
    overwritten.
    """
    global _RAY_HOME
    if _RAY_HOME is None or not Path(_RAY_HOME).is_dir():
        _RAY_HOME = tempfile.mkdtemp(prefix="ptqbench-ray-home-")
        atexit.register(shutil.rmtree, _RAY_HOME, ignore_errors=True)
        # O_EXCL: never through a link, even one planted between mkdtemp and here (the dir is 0700 anyway)
        fd = os.open(Path(_RAY_HOME) / "ray_bootstrap_config.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("provider: {type: local}\n")
    return _RAY_HOME


def import_ray():
    """The ray module, imported with the offline settings in the environment."""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)
    import ray

    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Start (or join) Ray with the offline settings; returns the ray module."""
    ray = import_ray()
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


class ResourceError(PtqbenchError):
    """A cell asks for more CPUs or GPUs than any node of the cluster has (Ray would wait forever)."""


def largest_node(ray) -> dict[str, float]:
    """The most CPUs and GPUs one alive node offers (a task runs on one node)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {key: max((n.get(key, 0.0) for n in nodes), default=0.0) for key in ("CPU", "GPU")}


def _run_cell_remote(cell, store_root: str) -> list[dict[str, Any]]:
    import harness  # noqa: F401  (offline defaults inside the worker)

    return list(run_cell(cell, store_root))


@register_executor("ray")
class RayExecutor(Executor):
    """One Ray task per cell; see the module docstring for the rules."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_cell: float | None = None,
                 max_retries: int = 2, resources: dict[str, Any] | None = None):
        self.address, self.num_cpus = address, num_cpus
        self.cpus_per_cell, self.max_retries = cpus_per_cell, max_retries
        self.resources = resources or {}

    @property
    def local_data(self) -> bool:
        """A cluster of its own on this machine reads this machine's data; a joined one may not."""
        return not (self.address or os.environ.get("RAY_ADDRESS"))

    def _options(self, cell, node: dict[str, float]) -> dict[str, Any]:
        """Ray options of one cell; `node` is the largest CPU and GPU count of one alive node."""
        wanted = {**self.resources, **getattr(cell, "resources", {})}  # the spec's request wins
        gpus = wanted.get("num_gpus")
        if gpus is None:
            gpus = gpus_for_model(cell.model, node["GPU"])
        # a cell computes with cell.threads torch threads whatever it is given (its numbers depend on them);
        # by default it asks for as many CPUs as a node can give, up to that
        cpus = wanted.get("num_cpus", self.cpus_per_cell)
        if cpus is None:
            cpus = min(cell.threads, node["CPU"])
        for key, asked, have in (("num_cpus", cpus, node["CPU"]), ("num_gpus", gpus, node["GPU"])):
            if asked < 0 or asked > have:
                raise ResourceError(f"{cell.describe()}: resources {key}={asked:g} cannot be scheduled: "
                                    f"the largest node of this Ray cluster has {have:g}")
        return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": self.max_retries, "retry_exceptions": False}

    def run(self, cells, store_root) -> Iterator[dict[str, Any]]:
        started_here = not import_ray().is_initialized()
        ray = init_ray(self.address, self.num_cpus)
        try:
            yield from self._run(ray, cells, store_root)
        finally:
            # a cluster this run started ends with it (also on Ctrl-C / SIGTERM, which the CLI turns into
            # KeyboardInterrupt): its agents would otherwise outlive the driver for minutes
            if started_here:
                ray.shutdown()

    def _run(self, ray, cells, store_root) -> Iterator[dict[str, Any]]:
        cells = list(cells)  # drawing claims them (harness.driver): Ray takes the whole matrix at once
        node = largest_node(ray)
        options = {id(cell): self._options(cell, node) for cell in cells}  # every request checked before any work
        # max_calls=1: a fresh worker process per cell, so nothing leaks from one model to the next
        remote = ray.remote(max_calls=1)(_run_cell_remote)
        # cells sharing a calibration run in sequence: the first fills the cache for the others
        chains: dict[str, list] = defaultdict(list)
        for cell in cells:
            chains[cell.calib_key or cell.describe()].append(cell)
        pending: dict[Any, tuple[str, Any]] = {}

        def submit(key: str) -> None:
            cell = chains[key].pop(0)
            ref = remote.options(**options[id(cell)]).remote(cell, str(store_root))
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
