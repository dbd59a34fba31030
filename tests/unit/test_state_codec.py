"""harness.state: typed method states round-trip bit for bit through safetensors + JSON, and a file
that does not match the loading class is a one-line error naming the file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from harness.errors import PtqbenchError
from harness.state import (
    STRUCTURE_FILE,
    TENSORS_FILE,
    State,
    StateError,
    StateFormatError,
    reachable_dataclasses,
    state_difference,
    states_equal,
)


@dataclass(kw_only=True)
class Site:
    u: torch.Tensor
    clip: torch.Tensor | None = None
    scale: float = 1.0


@dataclass(kw_only=True)
class Layer:
    sites: dict[str, Site]
    bias: torch.Tensor | None = None
    shape: tuple[int, int] = (0, 0)
    tags: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class NestedState(State):
    layers: list[Layer]
    extra: dict[str, torch.Tensor]
    pair: tuple[torch.Tensor, float]
    scalars: list[float]
    flags: tuple[bool, ...] = ()
    count: int = 0
    name: str = ""
    nothing: None = None
    maybe: Site | None = None


@dataclass(kw_only=True)
class PlainState(State):
    """A subclass with no fields of its own."""


@dataclass(kw_only=True)
class OtherState(State):
    layers: list[torch.Tensor]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def nested_example() -> NestedState:
    g = gen()
    layers = []
    for i in range(3):
        sites = {"qkv": Site(u=torch.randn(4, 4, generator=g), clip=torch.rand(4, generator=g), scale=0.1 * (i + 1)),
                 "o": Site(u=torch.randn(4, 4, generator=g, dtype=torch.float64))}
        layers.append(Layer(sites=sites, bias=None if i == 1 else torch.randn(4, generator=g).bfloat16(),
                            shape=(i, 4), tags=["a", f"layer{i}"]))
    return NestedState(
        layers=layers,
        extra={"f64": torch.randn(3, 2, generator=g, dtype=torch.float64),
               "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
               "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
               "bool": torch.rand(7, generator=g) > 0.5,
               "scalar": torch.tensor(float("nan")),
               "empty": torch.zeros(0, 3),
               "dotted.key": torch.ones(2)},
        pair=(torch.randn(2, 2, generator=g).t(), -0.0),  # a non-contiguous view
        scalars=[-0.0, 0.0, float("nan"), float("inf"), float("-inf"), 1e-300, 5e-324, 0.1 + 0.2, 1.0],
        flags=(True, False),
        count=-7,
        name="héllo \"quoted\"",
        maybe=Site(u=torch.tensor([1.5])),
        meta={"steps": 12, "loss": [0.5, float("nan")], "nested": {"a": None, "b": (1, 2)}},
    )


def test_nested_state_round_trips_bit_exact(tmp_path):
    state = nested_example()
    state.save(tmp_path / "s")
    assert {p.name for p in (tmp_path / "s").iterdir()} == {TENSORS_FILE, STRUCTURE_FILE}
    back = NestedState.load(tmp_path / "s")
    assert type(back) is NestedState and states_equal(state, back)
    # exact types, not just equal values
    assert type(back.layers[0]) is Layer and type(back.layers[0].sites["qkv"]) is Site
    assert type(back.pair) is tuple and type(back.layers[2].shape) is tuple and type(back.scalars) is list
    assert type(back.meta["nested"]["b"]) is tuple and type(back.scalars[-1]) is float and type(back.count) is int
    assert back.layers[1].bias is None and back.nothing is None
    assert math.copysign(1.0, back.scalars[0]) == -1.0 and math.copysign(1.0, back.pair[1]) == -1.0
    assert back.scalars[5] == 1e-300 and back.scalars[6] == 5e-324 and back.scalars[7] == 0.1 + 0.2
    assert math.isnan(back.scalars[2]) and back.scalars[3] == math.inf and back.scalars[4] == -math.inf
    assert back.extra["f64"].dtype == torch.float64 and back.extra["bf16"].dtype == torch.bfloat16
    assert back.extra["i64"].dtype == torch.int64 and back.extra["bool"].dtype == torch.bool
    assert torch.equal(back.extra["i64"], state.extra["i64"]) and back.extra["empty"].shape == (0, 3)
    assert torch.isnan(back.extra["scalar"]) and back.extra["scalar"].dim() == 0
    assert torch.equal(back.pair[0], state.pair[0])
    # the tensors are keyed by their path; the structure is strict JSON
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "s" / TENSORS_FILE)))
    assert {"layers.0.sites.qkv.u", "layers.2.sites.o.u", "extra.bf16", "pair.0", "maybe.u"} <= keys
    assert "layers.1.bias" not in keys
    json.loads((tmp_path / "s" / STRUCTURE_FILE).read_text(), parse_constant=lambda c: pytest.fail(c))
    # saving again overwrites; loading onto a device is honoured
    state.save(tmp_path / "s")
    assert states_equal(NestedState.load(tmp_path / "s", device="cpu"), state)


def test_states_equal_is_strict():
    a, b = nested_example(), nested_example()
    assert states_equal(a, b)
    b.layers[0].sites["qkv"].u[0, 0] = torch.nextafter(b.layers[0].sites["qkv"].u[0, 0], torch.tensor(9.0))
    assert not states_equal(a, b)
    b = nested_example()
    b.extra["f64"] = b.extra["f64"].float()
    assert not states_equal(a, b)  # same values, other dtype
    b = nested_example()
    b.scalars[0] = 0.0
    assert not states_equal(a, b)  # -0.0 vs 0.0
    b = nested_example()
    b.layers[0].shape = list(b.layers[0].shape)
    assert not states_equal(a, b)  # tuple vs list
    b = nested_example()
    b.count = float(b.count)
    assert not states_equal(a, b)  # int vs float
    b = nested_example()
    b.meta["steps"] = 13
    assert not states_equal(a, b) and states_equal(a, b, meta=False)
    assert not states_equal(PlainState(), State()) and states_equal(PlainState(), PlainState())
    assert state_difference(a, b) == "meta.steps: 12 vs 13"
    b = nested_example()
    b.layers[2].sites["o"].u[1, 1] += 1
    assert state_difference(a, b).startswith("layers.2.sites.o.u: tensors differ (1 of 16 elements, max |diff| 1")
    b.layers[2].sites["o"].u = b.layers[2].sites["o"].u.float()
    assert state_difference(a, b) == "layers.2.sites.o.u: torch.float64[4, 4] vs torch.float32[4, 4]"
    b = nested_example()
    b.extra["new"] = torch.ones(1)
    assert state_difference(a, b) == "extra: keys ['new'] in only one"
    assert state_difference(a, a) is None
    nan = torch.tensor([float("nan"), 1.0])
    assert states_equal(OtherState(layers=[nan]), OtherState(layers=[nan.clone()]))  # bit equality, NaN too


def test_subclass_without_fields_and_the_base_round_trip(tmp_path):
    plain = PlainState(meta={"note": "nothing to solve", "x": 1e-300})
    plain.save(tmp_path / "p")
    back = PlainState.load(tmp_path / "p")
    assert type(back) is PlainState and states_equal(back, plain)
    State(meta={"a": [1, 2.5]}).save(tmp_path / "b")
    assert states_equal(State.load(tmp_path / "b"), State(meta={"a": [1, 2.5]}))


def one_line_error(exc_info, path):
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, PtqbenchError) and "\n" not in msg
    assert str(path) in msg, msg
    return msg


def test_a_file_of_another_class_is_rejected(tmp_path):
    nested_example().save(tmp_path / "n")
    for cls in (OtherState, PlainState, State):
        with pytest.raises(StateFormatError) as info:
            cls.load(tmp_path / "n")
        assert "NestedState" in one_line_error(info, tmp_path / "n" / STRUCTURE_FILE)


def edit_structure(directory, edit):
    path = directory / STRUCTURE_FILE
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


def test_a_mismatched_structure_is_rejected(tmp_path):
    def expect(edit, *words):
        d = tmp_path / f"case{expect.n}"
        expect.n += 1
        nested_example().save(d)
        path = edit_structure(d, edit)
        with pytest.raises(StateFormatError) as info:
            NestedState.load(d)
        msg = one_line_error(info, path)
        assert all(w in msg for w in words), msg

    expect.n = 0
    root = lambda doc: doc["root"]["fields"]  # noqa: E731
    expect(lambda doc: root(doc).pop("count"), "missing field", "count")
    expect(lambda doc: root(doc).update(bogus=1), "unknown field", "bogus")
    expect(lambda doc: root(doc).update(count="7"), "count", "expected int")
    expect(lambda doc: root(doc).update(count=True), "count", "expected int")
    expect(lambda doc: root(doc).update(layers={"$tuple": []}), "layers", "expected a list")
    # a nested dataclass type must be one the class declares, never an arbitrary importable name
    expect(lambda doc: root(doc)["layers"][0].update({"$dataclass": "collections.OrderedDict"}), "layers.0",
           "collections.OrderedDict")
    expect(lambda doc: root(doc)["layers"][0].update({"$dataclass": f"{__name__}.Site"}), "layers.0", "Site")
    # tensors: placeholder and file must agree
    expect(lambda doc: root(doc)["extra"]["$dict"]["f64"].update(dtype="float32"), "extra.f64", "float64")
    expect(lambda doc: root(doc)["extra"]["$dict"]["f64"].update({"$tensor": "nope"}), "nope", "missing")
    expect(lambda doc: root(doc)["extra"]["$dict"].pop("f64"), "does not reference", "extra.f64")
    expect(lambda doc: root(doc)["pair"]["$tuple"].append(1.0), "pair", "tuple of 3")
    expect(lambda doc: doc.update(format="other"), "not a ptqbench.state/1 file")


def test_unreadable_files_are_one_line_errors(tmp_path):
    nested_example().save(tmp_path / "a")
    (tmp_path / "a" / STRUCTURE_FILE).write_text("{not json")
    with pytest.raises(StateFormatError) as info:
        NestedState.load(tmp_path / "a")
    one_line_error(info, tmp_path / "a" / STRUCTURE_FILE)
    nested_example().save(tmp_path / "b")
    (tmp_path / "b" / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.raises(StateFormatError) as info:
        NestedState.load(tmp_path / "b")
    one_line_error(info, tmp_path / "b" / STRUCTURE_FILE)


@dataclass(kw_only=True)
class Undeclared:
    x: int = 0


def test_unsupported_values_fail_at_save(tmp_path):
    with pytest.raises(StateError, match="meta.fn"):
        State(meta={"fn": print}).save(tmp_path / "a")
    with pytest.raises(StateError, match="meta.d: dict keys must be str"):
        State(meta={"d": {1: 2}}).save(tmp_path / "b")
    with pytest.raises(StateError, match="meta.x: dataclass .*Undeclared is not reachable"):
        State(meta={"x": Undeclared()}).save(tmp_path / "c")
    with pytest.raises(StateError, match="numpy"):
        import numpy as np

        State(meta={"v": np.float32(1.0)}).save(tmp_path / "d")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_reachable_classes_come_from_type_hints():
    assert set(reachable_dataclasses(NestedState)) == {f"{__name__}.{c}" for c in ("NestedState", "Layer", "Site")}
    assert set(reachable_dataclasses(PlainState)) == {f"{__name__}.PlainState"}
