"""Reliability probe regressions for the Ray executor (#11.14, #11.20), on a fake `ray` module: no cluster
is started, so these run in milliseconds; the real-cluster tests are in test_ray_executor.py."""
from __future__ import annotations

import os
import signal
import stat
import sys
import tempfile
import types
from pathlib import Path

import pytest

from harness.executors import ray as ray_executor
from harness.spec import load_spec

SPEC = "name: r\nmodels: [tiny-llama]\nmethods: [rtn]\nschemes: [w4a4, w8a8]\ntasks: [wikitext2]\n"


class Ref:
    def __init__(self, cell):
        self.cell = cell


class FakeRay(types.ModuleType):
    """Just what RayExecutor calls; `remote(...)` tasks run when they are waited for."""

    def __init__(self, cpus: float = 2, gpus: float = 0, fail_on_get: BaseException | None = None):
        super().__init__("ray")
        self.cpus, self.gpus, self.fail_on_get = cpus, gpus, fail_on_get
        self.initialized = self.shut_down = False
        self.submitted: list[dict] = []

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.initialized = True

    def shutdown(self):
        self.initialized, self.shut_down = False, True

    def nodes(self):
        return [{"Alive": True, "Resources": {"CPU": self.cpus, "GPU": self.gpus}}]

    def remote(self, **kwargs):
        fake = self

        class Task:
            def __init__(self, fn):
                self.fn = fn

            def options(self, **options):
                fake.submitted.append(options)
                return types.SimpleNamespace(remote=lambda cell, root: Ref(cell))

        return Task

    def wait(self, refs, num_returns=1):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if self.fail_on_get is not None:
            raise self.fail_on_get
        cell = ref.cell
        return [{"run_id": cell.run_ids[t.name], "status": "done", "task": t.name} for t in cell.tasks]


@pytest.fixture
def fake_ray(monkeypatch):
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    return fake


def cells(tmp_path, extra: str = ""):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC + extra)
    return load_spec(path).cells()


def test_a_cluster_started_by_the_run_is_shut_down_when_it_ends(tmp_path, fake_ray):
    records = list(ray_executor.RayExecutor().run(cells(tmp_path), tmp_path))
    assert len(records) == 2 and fake_ray.shut_down


def test_an_interrupted_run_shuts_its_cluster_down(tmp_path, fake_ray):
    """(#11.20) Ray's agents outlived a killed driver: Ctrl-C / SIGTERM (KeyboardInterrupt) end the cluster."""
    fake_ray.fail_on_get = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        list(ray_executor.RayExecutor().run(cells(tmp_path), tmp_path))
    assert fake_ray.shut_down


def test_the_driver_closes_an_abandoned_executor_at_once(tmp_path, fake_ray, monkeypatch):
    """The store failing mid-matrix must not leave the cluster to the garbage collector."""
    from harness.driver import run_matrix
    from harness.store import Store

    store = Store(tmp_path / "res")
    monkeypatch.setattr(store, "write", lambda record: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_matrix(cells(tmp_path), store, executor=ray_executor.RayExecutor())
    assert fake_ray.shut_down


def test_a_joined_cluster_is_left_running(tmp_path, fake_ray):
    fake_ray.initialized = True  # someone else's cluster (ray.init before, or an address)
    list(ray_executor.RayExecutor().run(cells(tmp_path), tmp_path))
    assert not fake_ray.shut_down


def test_an_infeasible_request_fails_before_anything_is_submitted(tmp_path, fake_ray):
    with pytest.raises(ray_executor.ResourceError) as err:
        list(ray_executor.RayExecutor().run(cells(tmp_path, "resources: {num_cpus: 64}\n"), tmp_path))
    assert fake_ray.submitted == [] and "num_cpus=64" in str(err.value) and fake_ray.shut_down


def test_ray_home_is_private_and_never_follows_a_planted_link(tmp_path, monkeypatch):
    """(#11.20) The fixed <tmp>/ptqbench-ray-home followed symlinks: a link there got its target overwritten."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "ptqbench-ray-home").symlink_to(tmp_path)  # the old fixed path, planted
    (tmp_path / "ray_bootstrap_config.yaml").symlink_to(victim)
    monkeypatch.setattr(ray_executor, "_RAY_HOME", None)
    home = Path(ray_executor.ray_home())
    assert victim.read_text() == "precious"
    assert home.parent == tmp_path and home.name != "ptqbench-ray-home" and not home.is_symlink()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and home.stat().st_uid == os.getuid()
    assert (home / "ray_bootstrap_config.yaml").read_text() == "provider: {type: local}\n"
    assert ray_executor.ray_home() == str(home)  # one per process


def test_sigterm_stops_the_cli_like_ctrl_c_with_finished_runs_recorded(tmp_path, monkeypatch, capsys):
    """(#11.20) SIGTERM raised no exception: no `finally` ran (Ray kept running). Now it is an interrupt."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    import engine_fakes

    import harness.runner as runner
    from harness.cli import main
    from harness.registry import get_method
    from harness.store import Store

    engine_fakes.install(monkeypatch)
    monkeypatch.setattr(runner, "calib_scheme", lambda cell: cell.scheme)
    cls = get_method("toy_raise")
    monkeypatch.setattr(cls, "calibrate", lambda self, ctx: os.kill(os.getpid(), signal.SIGTERM))
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: term\nmodels: [tiny-a]\nmethods: [fp, toy_raise, toy_rtn]\nschemes: [w4]\n"
                    "tasks: [toy_ppl]\nppl: {seqlen: 32, max_windows: 2}\ncalib: {n: 2, seqlen: 16}\n")
    before = signal.getsignal(signal.SIGTERM)
    code = main(["run", str(spec), "--results-dir", str(tmp_path / "res")])
    assert code == 128 + signal.SIGTERM
    assert "interrupted" in capsys.readouterr().err
    assert [r["method"] for r in Store(tmp_path / "res").records()] == ["fp"]  # finished before the signal
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler is removed again
