"""Method registry: decorator, built-ins, the ptqbench.methods entry-point group, params, State."""
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

import harness.registry as registry  # noqa: E402
from harness.errors import PtqbenchError, UnknownNameError  # noqa: E402
from harness.method import InvalidParamsError, Method, MethodParams, State  # noqa: E402


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty registry that has not discovered anything yet (restored after the test)."""
    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(engine_fakes.PLUGIN_DIST)])


def test_builtins_are_registered(fresh_registry):
    names = registry.list_methods()
    assert {"fp", "rtn", "gptq"} <= set(names)
    assert registry.get_method("gptq").name == "gptq"
    assert "toy_rtn" not in names  # the test plugin is not on sys.path


def test_unknown_method_lists_the_registered_ones(fresh_registry):
    with pytest.raises(UnknownNameError) as info:
        registry.get_method("gptqq")
    msg = str(info.value)
    assert "'gptqq'" in msg and all(f" {m}," in msg or msg.endswith(f" {m}") for m in ("fp", "gptq", "rtn"))
    assert "\n" not in msg


def test_entry_point_plugins_are_discovered(fresh_registry, monkeypatch):
    with pytest.raises(UnknownNameError):
        registry.get_method("toy_rtn")
    monkeypatch.syspath_prepend(str(engine_fakes.PLUGIN_DIST))  # holds ptqbench_testplugin-0.1.0.dist-info
    registry.discover(force=True)
    cls = registry.get_method("toy_rtn")
    assert cls.__module__ == "ptqbench_testplugin.methods" and cls.name == "toy_rtn"
    assert {"toy_calib", "toy_raise", "toy_sleepy", "fp"} <= set(registry.list_methods())
    # a plugin that fails to import is reported by name and does not hide the others
    assert "ImportError" in registry.broken_methods()["toy_broken"]
    with pytest.raises(registry.MethodLoadError, match="toy_broken.*not installed"):
        registry.get_method("toy_broken")


def test_register_decorator(monkeypatch):
    registry.discover()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @registry.register_method("unit_local")
    class Local(Method):
        class Params(MethodParams):
            alpha: float = 0.5

        def apply(self, model, adapter, state, scheme):
            return model

    assert registry.get_method("unit_local") is Local and Local.name == "unit_local"
    registry.register_method("unit_local")(Local)  # re-registering the same class is harmless

    class Other(Method):
        pass

    with pytest.raises(PtqbenchError, match="already registered"):
        registry.register_method("unit_local")(Other)
    with pytest.raises(PtqbenchError, match="expects a Method subclass"):
        registry.register_method("not_a_method")(object)


def test_params_are_typed_validated_and_frozen():
    gptq = registry.get_method("gptq")
    params = gptq({"damp": "0.02"}).params  # lax parsing of a YAML string number
    assert params.damp == 0.02 and params.block_size == 128 and params.act_order is False
    with pytest.raises(InvalidParamsError, match="unknown param 'dampp'.*valid params: block_size"):
        gptq({"dampp": 0.1})
    with pytest.raises(InvalidParamsError, match=r"param damp=0"):
        gptq({"damp": 0})
    with pytest.raises(InvalidParamsError, match="must be a mapping"):
        gptq([1, 2])
    with pytest.raises(Exception):
        params.damp = 0.5  # frozen: a run's params cannot drift after its id was computed


@dataclass(kw_only=True)
class _TensorsState(State):
    tensors: dict[str, torch.Tensor]


def test_state_round_trip(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    state = _TensorsState(tensors={"a": base, "b/view": base[:, 1]}, meta={"note": "x", "n": 3})
    state.save(tmp_path / "s")
    loaded = _TensorsState.load(tmp_path / "s")
    assert loaded.meta == {"note": "x", "n": 3}
    assert torch.equal(loaded.tensors["a"], base) and torch.equal(loaded.tensors["b/view"], base[:, 1])
