"""Executor registry: built-ins resolved lazily by name, plugins through the ptqbench.executors entry points."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

import harness.executors as executors  # noqa: E402
from harness.driver import run_matrix  # noqa: E402
from harness.errors import UnknownNameError  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.store import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC = "models: [tiny-a]\nmethods: [toy_rtn]\nschemes: [w8, w4]\ntasks: [toy_ppl]\nppl: {seqlen: 16, max_windows: 1}\n"


@pytest.fixture
def registry(monkeypatch):
    """The executor registry as it was, restored after the test (plugins registered here go away)."""
    monkeypatch.setattr(executors, "_EXECUTORS", dict(executors._EXECUTORS))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(engine_fakes.PLUGIN_DIST)])


def test_local_does_not_import_ray():
    code = ("import sys; from harness.executors import get_executor, list_executors; "
            "assert get_executor('local').name == 'local'; assert {'local', 'ray'} <= set(list_executors()); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_builtins_by_name(registry):
    from harness.executors.local import LocalExecutor
    from harness.executors.ray import RayExecutor

    assert isinstance(executors.get_executor("local"), LocalExecutor)
    ray = executors.get_executor("ray", address="127.0.0.1:1")  # nothing starts before run()
    assert isinstance(ray, RayExecutor) and ray.name == "ray" and ray.address == "127.0.0.1:1"


def test_unknown_executor_is_a_one_line_error(registry):
    with pytest.raises(UnknownNameError) as info:
        executors.get_executor("slurm")
    assert str(info.value) == "unknown executor 'slurm'; choose one of: local, ray"


def test_entry_point_executor_is_found_and_runs(registry, monkeypatch, tmp_path):
    engine_fakes.install(monkeypatch)  # toy world; puts the plugin distribution on sys.path
    assert {"local", "ray", "toy_reversed", "toy_broken"} <= set(executors.list_executors())
    ex = executors.get_executor("toy_reversed")
    assert type(ex).__module__ == "ptqbench_testplugin.executors" and ex.name == "toy_reversed"
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    cells = load_spec(path).cells()
    store = Store(tmp_path / "res")
    summary = run_matrix(cells, store, "toy_reversed")
    assert summary.done == summary.total == 2
    assert {r["executor"] for r in store.records()} == {"toy_reversed"}


def test_broken_executor_plugin_is_a_one_line_error_naming_it(registry, monkeypatch):
    monkeypatch.syspath_prepend(str(engine_fakes.PLUGIN_DIST))
    with pytest.raises(executors.ExecutorLoadError) as info:
        executors.get_executor("toy_broken")
    msg = str(info.value)
    assert msg.startswith("executor 'toy_broken' (ptqbench_testplugin.broken) failed to import: ImportError")
    assert "\n" not in msg


def test_register_decorator(registry):
    @executors.register_executor("unit_inline")
    class Inline(executors.Executor):
        def run(self, cells, store_root):
            return iter(())

    assert executors.get_executor("unit_inline").name == "unit_inline"
    assert "unit_inline" in executors.list_executors()
    with pytest.raises(executors.PtqbenchError, match="expects an Executor subclass"):
        executors.register_executor("bad")(object)
