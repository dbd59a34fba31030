"""Spec validation, matrix expansion and run ids (toy catalogs from tests/fixtures/engine_fakes.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.errors import PtqbenchError  # noqa: E402
from harness.spec import SpecError, load_spec, run_key  # noqa: E402


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
models: [tiny-a, tiny-b]
methods: [fp, toy_rtn, {name: toy_calib, params: [{spread: 0.1}, {spread: 0.3}]}]
schemes: [w8, w4]
tasks: [toy_ppl, toy_acc]
ppl: {seqlen: 32, max_windows: 2}
calib: {n: 2, seqlen: 16}
seeds: [0, 1]
"""


def test_expansion_counts_and_dedup(tmp_path):
    cells = load_spec(write(tmp_path, BASE)).cells()
    by_method = {}
    for c in cells:
        by_method.setdefault(c.method_label, []).append(c)
    # fp ignores schemes and seeds: one cell per model, recorded under w16a16, seed None
    assert len(by_method["fp"]) == 2 and {c.scheme_name for c in by_method["fp"]} == {"w16a16"}
    assert {c.seed for c in by_method["fp"]} == {None}
    # toy_rtn ignores seeds, not schemes: models x schemes
    assert len(by_method["toy_rtn"]) == 4
    # toy_calib: 2 variants x 2 models x 2 schemes x 2 seeds, labelled by their non-default params
    assert len(by_method["toy_calib"]) + len(by_method["toy_calib(spread=0.3)"]) == 16
    assert all(len(c.tasks) == 2 for c in cells)
    ids = [rid for c in cells for rid in c.run_ids.values()]
    assert len(ids) == len(set(ids)) == 2 * (2 + 4 + 16)


def test_include_exclude_and_task_rules(tmp_path):
    text = BASE + """
exclude:
  - {method: toy_calib, scheme: w8}
  - {task: toy_acc, method: [toy_rtn, fp]}
include:
  - {model: tiny-a}
"""
    cells = load_spec(write(tmp_path, text)).cells()
    assert {c.model for c in cells} == {"tiny-a"}
    assert not any(c.method == "toy_calib" and c.scheme_name == "w8" for c in cells)
    for c in cells:
        names = [t.name for t in c.tasks]
        assert names == (["toy_ppl"] if c.method in ("toy_rtn", "fp") else ["toy_ppl", "toy_acc"])


def test_params_rule_matches_variant(tmp_path):
    text = BASE + "exclude: [{method: toy_calib, params: {spread: 0.3}}]\n"
    labels = {c.method_label for c in load_spec(write(tmp_path, text)).cells()}
    assert labels == {"fp", "toy_rtn", "toy_calib"}


def test_rules_match_a_methods_label(tmp_path):
    text = BASE.replace("toy_rtn,", "{name: toy_rtn, label: plain},") + "exclude: [{method: plain, scheme: w8}]\n"
    cells = load_spec(write(tmp_path, text)).cells()
    assert {c.scheme_name for c in cells if c.method_label == "plain"} == {"w4"}


def test_scale_overrides_merge_mappings_and_replace_lists(tmp_path):
    text = BASE + """
scales:
  smoke: {models: [tiny-b], ppl: {max_windows: 1}, calib: {n: 1}, seeds: [3]}
"""
    spec = load_spec(write(tmp_path, text))
    cells = spec.cells("smoke")
    assert {c.model for c in cells} == {"tiny-b"}
    calib_cells = [c for c in cells if c.method == "toy_calib"]
    assert {c.seed for c in calib_cells} == {3}
    assert calib_cells[0].calib == {"corpus": "c4", "n": 1, "seqlen": 16}  # merged key by key
    ppl = next(t for t in cells[0].tasks if t.name == "toy_ppl")
    assert ppl.settings == {"seqlen": 32, "max_windows": 1, "batch_size": 1}
    assert ppl.protocol == {"seqlen": 32, "max_windows": 1}  # batch size is speed only


def test_run_ids_stable_and_only_sensitive_to_what_changes_the_number(tmp_path):
    a = {(c.method_label, c.scheme_name, c.seed, c.model): c for c in load_spec(write(tmp_path, BASE)).cells()}
    again = {(c.method_label, c.scheme_name, c.seed, c.model): c for c in load_spec(write(tmp_path, BASE)).cells()}
    assert {k: c.run_ids for k, c in a.items()} == {k: c.run_ids for k, c in again.items()}
    # adding a task and changing the lm-eval batch size (speed only) keeps every existing id
    more = BASE.replace("tasks: [toy_ppl, toy_acc]", "tasks: [toy_ppl, {name: toy_acc, batch_size: 2}, toy_ppl2]")
    b = {(c.method_label, c.scheme_name, c.seed, c.model): c for c in load_spec(write(tmp_path, more, "b.yaml")).cells()}
    for key, cell in a.items():
        assert b[key].run_ids["toy_ppl"] == cell.run_ids["toy_ppl"]
        assert b[key].run_ids["toy_acc"] == cell.run_ids["toy_acc"]
        assert b[key].calib_key == cell.calib_key
    # a protocol change moves only that task's ids
    longer = BASE.replace("ppl: {seqlen: 32, max_windows: 2}", "ppl: {seqlen: 64, max_windows: 2}")
    c = {(c.method_label, c.scheme_name, c.seed, c.model): c for c in load_spec(write(tmp_path, longer, "c.yaml")).cells()}
    for key, cell in a.items():
        assert c[key].run_ids["toy_ppl"] != cell.run_ids["toy_ppl"]
        assert c[key].run_ids["toy_acc"] == cell.run_ids["toy_acc"]


def test_run_key_contents(tmp_path):
    cell = next(c for c in load_spec(write(tmp_path, BASE)).cells() if c.method == "toy_calib")
    ppl, acc = cell.tasks
    key = run_key(cell, ppl)
    for field in ("model", "source", "revision", "method", "params", "method_version", "scheme", "calib",
                  "seed", "task", "protocol", "versions", "dtype"):
        assert field in key
    assert {"torch", "transformers", "ptqbench"} <= set(key["versions"])
    assert "lm-eval" not in key["versions"] and "lm-eval" in run_key(cell, acc)["versions"]


def test_method_version_and_calib_key_scope(tmp_path, monkeypatch):
    from harness.registry import get_method

    spec = load_spec(write(tmp_path, BASE))
    before = {(c.method_label, c.scheme_name, c.seed, c.model): c for c in spec.cells()}
    monkeypatch.setattr(get_method("toy_calib"), "version", 2)
    after = {(c.method_label, c.scheme_name, c.seed, c.model): c for c in spec.cells()}
    for key, cell in before.items():
        changed = cell.method == "toy_calib"
        assert (after[key].run_ids != cell.run_ids) == changed
        assert (after[key].calib_key != cell.calib_key) == changed
    # toy_calib's state depends only on the weight bits: the same key for any scheme with those bits
    spec2 = load_spec(write(tmp_path, BASE.replace("schemes: [w8, w4]", "schemes: [w4, nan_scheme]"), "d.yaml"))
    keys = {}
    for c in spec2.cells():
        if c.method == "toy_calib":
            keys.setdefault((c.method_label, c.seed, c.model), set()).add(c.calib_key)
    assert all(len(v) == 1 for v in keys.values())


def test_name_defaults_to_file_stem(tmp_path):
    assert load_spec(write(tmp_path, BASE, "my_exp.yaml")).name == "my_exp"
    assert load_spec(write(tmp_path, "name: other\n" + BASE)).name == "other"


def test_every_scale_is_validated_at_load(tmp_path):
    text = BASE + "scales:\n  smoke: {seeds: [0]}\n  full: {methods: [gptqq]}\n"
    with pytest.raises(SpecError, match="gptqq"):
        load_spec(write(tmp_path, text))


# --- bad inputs: one line naming the bad value and the choices ---------------------------------

BAD = [
    ("unknown_method", BASE.replace("fp, toy_rtn", "fp, gptqq"), None, ["'gptqq'", "toy_rtn", "fp"]),
    ("unknown_scheme", BASE.replace("[w8, w4]", "[w8, w5]"), None, ["'w5'", "w4", "nan_scheme"]),
    ("unknown_model", BASE.replace("tiny-a, tiny-b", "tiny-a, tiny-c"), None, ["'tiny-c'", "tiny-a", "tiny-b"]),
    ("unknown_task", BASE.replace("[toy_ppl, toy_acc]", "[toy_ppl, wikitext3]"), None, ["'wikitext3'", "toy_ppl", "kl"]),
    ("bad_param_type", BASE.replace("{spread: 0.1}", "{spread: lots}"), None, ["lots", "spread", "float"]),
    ("unknown_param", BASE.replace("toy_rtn,", "{name: toy_rtn, params: {clipp: 0.9}},"), None, ["clipp", "clip"]),
    ("param_out_of_range", BASE.replace("toy_rtn,", "{name: toy_rtn, params: {clip: 2}},"), None, ["2", "clip", "less than or equal to 1"]),
    ("wrong_bits", BASE.replace("[w8, w4]", "[w8, {name: w33, bits: 33}]"), None, ["33", "2..16"]),
    ("malformed_yaml", BASE.replace("schemes: [w8, w4]", "schemes: [w8, w4"), None, ["spec.yaml:", "malformed YAML"]),
    ("empty_matrix", BASE + "exclude: [{model: [tiny-a, tiny-b]}]\n", None, ["matrix is empty"]),
    ("unknown_rule_key", BASE + "exclude: [{sheme: w4}]\n", None, ["'sheme'", "scheme", "model", "task"]),
    ("unknown_top_level_key", BASE + "modles: [tiny-a]\n", None, ["'modles'", "models", "schemes"]),
    ("unknown_scale", BASE + "scales:\n  smoke: {seeds: [0]}\n", "smok", ["'smok'", "smoke"]),
    ("unknown_task_setting", BASE.replace("[toy_ppl, toy_acc]", "[{name: toy_ppl, seqlenn: 3}]"), None, ["'seqlenn'", "seqlen", "max_windows"]),
    ("nonpositive_calib_n", BASE.replace("{n: 2, seqlen: 16}", "{n: -1, seqlen: 16}"), None, ["-1", "calib.n", "greater than 0"]),
    ("unknown_method_in_rule", BASE + "exclude: [{method: gptqq}]\n", None, ["'gptqq'", "toy_rtn"]),
    ("bad_seqlen_type", BASE.replace("ppl: {seqlen: 32", "ppl: {seqlen: long"), None, ["long", "seqlen", "integer"]),
    ("unknown_calib_key", BASE.replace("{n: 2, seqlen: 16}", "{size: 2}"), None, ["'size'", "corpus, n, seqlen"]),
    ("empty_methods", BASE.replace("methods: [fp, toy_rtn, {name: toy_calib, params: [{spread: 0.1}, {spread: 0.3}]}]", "methods: []"), None, ["methods is empty"]),
    ("bad_dtype", BASE + "dtype: fp13\n", None, ["fp13", "float32", "bfloat16"]),
    ("unknown_method_entry_key", BASE.replace("toy_rtn,", "{name: toy_rtn, parms: {}},"), None, ["'parms'", "params", "label"]),
    ("spec_not_mapping", "- a\n- b\n", None, ["must be a mapping"]),
    ("duplicate_task", BASE.replace("[toy_ppl, toy_acc]", "[toy_ppl, toy_ppl]"), None, ["'toy_ppl'", "twice"]),
    ("broken_plugin", BASE.replace("fp, toy_rtn", "fp, toy_broken"), None, ["'toy_broken'", "ImportError", "not installed"]),
    ("bad_seed", BASE.replace("seeds: [0, 1]", "seeds: [zero]"), None, ["zero", "seeds", "integer"]),
]


@pytest.mark.parametrize("case, text, scale, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_value_and_choices(tmp_path, case, text, scale, expected):
    path = write(tmp_path, text)
    with pytest.raises(PtqbenchError) as info:
        load_spec(path).cells(scale)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_errors_point_at_the_line(tmp_path):
    text = "models: [tiny-a]\nmethods:\n  - fp\n  - gptqq\nschemes: [w4]\ntasks: [toy_ppl]\n"
    with pytest.raises(SpecError, match=r"spec\.yaml:4: methods\.1: unknown method 'gptqq'"):
        load_spec(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(SpecError, match="cannot read spec 'nope.yaml'"):
        load_spec("nope.yaml")


def test_unknown_calibration_corpus(tmp_path):
    with pytest.raises(SpecError, match=r"calib\.corpus: unknown calibration corpus 'pile'; choose one of: c4"):
        load_spec(write(tmp_path, BASE.replace("{n: 2, seqlen: 16}", "{corpus: pile, n: 2}")))
