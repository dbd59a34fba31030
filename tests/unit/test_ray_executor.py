"""The Ray executor on a real local Ray cluster (offline settings), with the real quant/eval stack on a
tiny Llama: same numbers as the local executor, and a worker SIGKILLed mid-cell is retried."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from harness.driver import run_matrix
from harness.spec import load_spec
from harness.store import Store

ray = pytest.importorskip("ray")
PLUGIN_DIST = Path(__file__).resolve().parents[1] / "fixtures" / "plugin_dist"

SPEC = """
name: ray_check
models: [tiny-llama]
methods: [fp, rtn, {name: gptq, params: {block_size: 32}}]
schemes: [w4a4]
tasks: [wikitext2]
ppl: {seqlen: 64, max_windows: 2}
calib: {corpus: c4, n: 2, seqlen: 64}
"""


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU local cluster whose workers can import the test plugin (for the kill-once method)."""
    from harness import registry
    from harness.executors.ray import init_ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIST), saved) if p)
    sys.path.insert(0, str(PLUGIN_DIST))
    registry.discover(force=True)
    init_ray(num_cpus=2)
    yield
    ray.shutdown()
    sys.path.remove(str(PLUGIN_DIST))
    registry.discover(force=True)
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


def values(store: Store) -> dict:
    return {(r["method"], r["scheme"], r["task"]): (r["status"], r["metrics"].get("ppl"))
            for r in store.records()}


def die_once_cells(tmp_path, other_method: str, marker: Path):
    """Cells of `other_method` and of a method that SIGKILLs its worker the first time it runs."""
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.replace("methods: [fp, rtn, {name: gptq, params: {block_size: 32}}]",
                                 f"methods: [{other_method}, {{name: toy_die_once, params: {{marker: '{marker}'}}}}]"))
    return load_spec(path).cells()


def test_ray_gives_the_same_numbers_as_local(tmp_path, cluster):
    from harness.executors.ray import RayExecutor

    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    local, remote = Store(tmp_path / "local"), Store(tmp_path / "ray")
    assert run_matrix(load_spec(path).cells(), local).failed == 0
    summary = run_matrix(load_spec(path).cells(), remote, executor=RayExecutor(num_cpus=2))
    assert summary.failed == 0 and summary.done == 3
    assert values(remote) == values(local)
    assert all(r["executor"] == "ray" for r in remote.records())
    # (#11.2) each worker computed with the cell's thread count, recorded in the protocol like the local run's
    assert {r["protocol"]["threads"] for r in remote.records()} == {r["protocol"]["threads"] for r in local.records()} == {2}


def test_a_killed_worker_is_retried_and_the_cell_completes(tmp_path, cluster):
    from harness.executors.ray import RayExecutor

    marker = tmp_path / "killed.txt"
    store = Store(tmp_path / "res")
    summary = run_matrix(die_once_cells(tmp_path, "rtn", marker), store, executor=RayExecutor(num_cpus=2, max_retries=2))
    assert marker.exists(), "the worker was never killed"
    assert summary.failed == 0 and summary.done == 2
    got = values(store)
    # the retried cell is plain RTN after its first attempt died: same perplexity as rtn
    assert got[("toy_die_once", "w4a4", "wikitext2")] == got[("rtn", "w4a4", "wikitext2")]
    assert got[("rtn", "w4a4", "wikitext2")][0] == "done"


def test_a_cell_that_keeps_dying_is_recorded_as_failed(tmp_path, cluster):
    from harness.executors.ray import RayExecutor

    store = Store(tmp_path / "res")
    summary = run_matrix(die_once_cells(tmp_path, "fp", tmp_path / "killed.txt"), store,
                         executor=RayExecutor(num_cpus=2, max_retries=0))
    assert summary.failed == 1 and summary.done == 1
    failed = [r for r in store.records() if r["status"] == "failed"]
    assert len(failed) == 1 and "[worker]" in failed[0]["error"] and "\n" not in failed[0]["error"]
