"""Method params are validated once, when the spec is resolved, and travel typed on the cell (pickled for Ray)."""
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.driver import run_matrix  # noqa: E402
from harness.registry import get_method  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.store import Store  # noqa: E402

SPEC = """
models: [tiny-a, tiny-b]
methods: [fp, {name: toy_rtn, params: [{clip: 0.9}, {}]}]
schemes: [w8, w4]
tasks: [toy_ppl, toy_ppl2]
ppl: {seqlen: 16, max_windows: 1}
"""


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)


@pytest.fixture
def cells(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return load_spec(path).cells()


def test_cells_carry_the_typed_params_and_their_json(cells):
    for cell in cells:
        cls = get_method(cell.method)
        assert type(cell.params) is cls.Params
        assert cell.method_params == cell.params.model_dump(mode="json")  # the hashed, recorded form
    assert {c.method_params["clip"] for c in cells if c.method == "toy_rtn"} == {0.9, 1.0}


def test_params_are_validated_once(tmp_path, monkeypatch):
    calls = []
    cls = get_method("toy_rtn")
    original = cls.validate_params.__func__

    def counting(klass, params):
        if not isinstance(params, klass.Params):  # an instance passes through: not a validation
            calls.append(params)
        return original(klass, params)

    monkeypatch.setattr(cls, "validate_params", classmethod(counting))
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    spec = load_spec(path)
    assert calls == [{"clip": 0.9}, {}]  # one per variant, while the spec is checked
    cells = spec.cells()
    summary = run_matrix(cells, Store(tmp_path / "res"))
    assert summary.done == summary.total == 2 * (1 + 2 * 2) * 2
    assert calls == [{"clip": 0.9}, {}]  # expansion and the runner reuse the validated Params


def test_cells_pickle(cells):
    restored = pickle.loads(pickle.dumps(cells))
    assert restored == cells
    assert [c.run_ids for c in restored] == [c.run_ids for c in cells]
    assert all(type(r.params) is type(c.params) for r, c in zip(restored, cells))
