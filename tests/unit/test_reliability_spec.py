"""Reliability probe regressions for spec loading (toy catalogs from tests/fixtures/engine_fakes.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.errors import InvalidValueError  # noqa: E402
from harness.spec import SpecError, load_spec  # noqa: E402


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
models: [tiny-a]
methods: [fp, toy_rtn, {name: toy_calib, params: {spread: 0.1}}]
schemes: [w8, w4]
tasks: [toy_ppl]
ppl: {seqlen: 32, max_windows: 2}
calib: {n: 2, seqlen: 16}
seeds: [0, 1]
"""


def _err(tmp_path, text) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text)).cells()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# defect 3 ----------------------------------------------------------------------------------
def test_duplicate_method_labels_rejected(tmp_path):
    text = BASE.replace("methods: [fp, toy_rtn,", "methods: [fp, {name: toy_rtn, label: x}, {name: fp, label: x},")
    msg = _err(tmp_path, text)
    assert "'x'" in msg and "twice" in msg and "spec.yaml:" in msg


def test_same_method_listed_twice_rejected(tmp_path):
    msg = _err(tmp_path, BASE.replace("methods: [fp, toy_rtn,", "methods: [fp, toy_rtn, toy_rtn,"))
    assert "'toy_rtn'" in msg and "twice" in msg


def test_duplicate_scheme_names_rejected(tmp_path):
    msg = _err(tmp_path, BASE.replace("schemes: [w8, w4]", "schemes: [w8, w4, w8]"))
    assert "'w8'" in msg and "twice" in msg and "spec.yaml:4" in msg


def test_distinct_labels_still_fine(tmp_path):
    text = BASE.replace("methods: [fp, toy_rtn,", "methods: [fp, toy_rtn, {name: toy_calib, label: a, params: {spread: 0.2}},")
    labels = {c.method_label for c in load_spec(write(tmp_path, text)).cells()}
    assert {"a", "toy_calib"} <= labels


# defect 4 ----------------------------------------------------------------------------------
def test_empty_calib_list_rejected(tmp_path):
    msg = _err(tmp_path, BASE.replace("calib: {n: 2, seqlen: 16}", "calib: []"))
    assert "calib" in msg and "empty" in msg and "spec.yaml:7" in msg


@pytest.mark.parametrize("value", ["[5]", "[[]]", "['c4']", "[{n: 2, seqlen: 16}, 3]"])
def test_non_mapping_calib_rejected(tmp_path, value):
    msg = _err(tmp_path, BASE.replace("calib: {n: 2, seqlen: 16}", f"calib: {value}"))
    assert "calib" in msg and "mapping" in msg


@pytest.mark.parametrize("value", ["5", "c4", "true"])
def test_scalar_calib_rejected(tmp_path, value):
    with pytest.raises(SpecError):
        load_spec(write(tmp_path, BASE.replace("calib: {n: 2, seqlen: 16}", f"calib: {value}")))


def test_empty_calib_in_scale_rejected(tmp_path):
    text = BASE + "scales:\n  s: {calib: []}\n"
    with pytest.raises(SpecError, match="calib list is empty"):
        load_spec(write(tmp_path, text))


# defect 7 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", "true", "false", str(2 ** 63), str(2 ** 70), "1.0", "'3'"])
def test_bad_seeds_rejected(tmp_path, seed):
    msg = _err(tmp_path, BASE.replace("seeds: [0, 1]", f"seeds: [0, {seed}]"))
    assert "seed" in msg and "2**63" in msg and "spec.yaml:8" in msg


def test_largest_seed_accepted(tmp_path):
    cells = load_spec(write(tmp_path, BASE.replace("seeds: [0, 1]", f"seeds: [0, {2 ** 63 - 1}]"))).cells()
    assert {c.seed for c in cells} >= {0, 2 ** 63 - 1}


@pytest.mark.parametrize("seed", ["-1", "true", str(2 ** 64)])
def test_bad_rule_seed_rejected(tmp_path, seed):
    msg = _err(tmp_path, BASE + f"exclude: [{{seed: {seed}}}]\n")
    assert "seed" in msg


@pytest.mark.parametrize("seed", [-1, True, 2 ** 63, 1.0])
def test_calibration_windows_rejects_bad_seed(seed):
    from harness.data.text import calibration_windows

    with pytest.raises(InvalidValueError):
        calibration_windows(None, "c4", n=1, seqlen=4, seed=seed)


# defect 5 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule, word", [
    ("{scheme: w44}", "w44"), ("{model: tiny-z}", "tiny-z"), ("{scheme: [w8, w44]}", "w44"),
    ("{params: {spread: 0.7}}", "spread"), ("{params: {sprad: 0.1}}", "sprad"),
    ("{method: toy_calib, params: {spread: 0.1, clip: 3}}", "clip"), ("{seed: 7}", "7"),
])
def test_rule_value_naming_nothing_is_an_error(tmp_path, rule, word):
    for key in ("exclude", "include"):
        msg = _err(tmp_path, BASE + f"{key}: [{rule}]\n")
        assert word in msg and "spec.yaml:9" in msg


def test_rule_method_not_in_matrix_is_an_error(tmp_path):
    text = BASE.replace("methods: [fp, toy_rtn,", "methods: [fp,") + "exclude: [{method: toy_rtn}]\n"
    assert "toy_rtn" in _err(tmp_path, text)


@pytest.mark.parametrize("rule", ["{scheme: w16a16, method: fp}", "{params: {spread: 0.1}}", "{seed: 1}",
                                  "{model: tiny-a, scheme: [w8, w4], task: toy_ppl, method: toy_rtn}"])
def test_rules_naming_the_matrix_are_fine(tmp_path, rule):
    load_spec(write(tmp_path, BASE + f"exclude: [{rule}]\n")).cells()


# defect 17 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, line", [
    (BASE + "seeds: [5]\n", 9),
    (BASE.replace("calib: {n: 2, seqlen: 16}", "calib: {n: 2, seqlen: 16, n: 4}"), 7),
    (BASE + "scales:\n  s:\n    seeds: [1]\n    seeds: [2]\n", 12),
])
def test_duplicate_yaml_keys_rejected(tmp_path, text, line):
    msg = _err(tmp_path, text)
    assert "duplicate key" in msg and f"spec.yaml:{line}:" in msg


def test_yaml_merge_keys_still_work(tmp_path):
    text = BASE + "scales:\n  a: &a {calib: {n: 2, seqlen: 16}}\n  b: {<<: *a, calib: {n: 3, seqlen: 16}}\n"
    spec = load_spec(write(tmp_path, text))
    assert {c.calib["n"] for c in spec.cells("b") if c.calib} == {3}


# defect 16 ---------------------------------------------------------------------------------
def test_non_utf8_spec_is_one_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(BASE.encode() + b"name: caf\xe9\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "UTF-8" in str(info.value) and "spec.yaml:9" in str(info.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) + "models: *i\n"


def test_alias_bomb_refused_quickly(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, BOMB))
    assert time.monotonic() - start < 5
    assert "alias" in str(info.value) and len(str(info.value)) < 400


def test_recursive_alias_refused(tmp_path):
    with pytest.raises(SpecError, match="alias"):
        load_spec(write(tmp_path, BASE + "notes: &n [*n]\n"))


def test_moderate_alias_use_still_fine(tmp_path):
    text = BASE + "scales:\n  s: {ppl: &p {seqlen: 32, max_windows: 2}}\n  t: {ppl: *p}\n"
    load_spec(write(tmp_path, text))


def test_huge_value_is_not_echoed_whole(tmp_path):
    msg = _err(tmp_path, BASE.replace("tasks: [toy_ppl]", "tasks: [toy_ppl, '" + "z" * 100_000 + "']"))
    assert "unknown task" in msg and len(msg) < 1200
    msg = _err(tmp_path, BASE.replace("seeds: [0, 1]", "seeds: [0, '" + "9" * 50_000 + "']"))
    assert len(msg) < 1200
    msg = _err(tmp_path, BASE + "exclude: [{scheme: '" + "q" * 50_000 + "'}]\n")
    assert len(msg) < 1200
