"""The bad-input table (#11): every bad input a user can give, through the CLI or the API, is an exit code
(2 for the CLI) and one line naming the bad value and what would have been valid; no traceback.

A row is (id, input, words the one line must contain). The CLI rows run `ptqbench` in-process; the spec
rows write a spec from a valid base with one key changed and `ptqbench run --dry-run` it.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.errors import PtqbenchError

BASE = {"name": "bad", "models": ["tiny-llama"], "methods": ["rtn"], "schemes": ["w4a4"], "tasks": ["wikitext2"],
        "ppl": {"seqlen": 32, "max_windows": 1}}
GPTQ = {"methods": ["gptq"]}

# ---- a spec with one bad key (ptqbench run SPEC --dry-run) --------------------------------------------
SPEC_ROWS = [
    ("model_unknown", {"models": ["smollm-9000"]}, ["'smollm-9000'", "choose one of", "tiny-llama"]),
    ("model_missing_dir", {"models": ["./no/such/dir/"]}, ["'./no/such/dir/'", "does not exist"]),
    ("model_missing_gguf", {"models": ["/nope/model.gguf"]}, ["/nope/model.gguf", "does not exist"]),
    ("models_not_a_list", {"models": 5}, ["models", "valid list", "5"]),
    ("models_empty", {"models": []}, ["models is empty"]),
    ("method_unknown", {"methods": ["quarott"]}, ["'quarott'", "choose one of", "quarot"]),
    ("method_not_a_name", {"methods": [7]}, ["methods.0", "7"]),
    ("method_entry_key", {"methods": [{"nme": "gptq"}]}, ["'nme'", "valid keys", "name"]),
    ("method_params_not_mapping", {"methods": [{"name": "gptq", "params": 3}]}, ["params", "3"]),
    ("method_param_type", {"methods": [{"name": "gptq", "params": {"block_size": "big"}}]},
     ["block_size='big'", "valid params"]),
    ("method_param_bool", {"methods": [{"name": "gptq", "params": {"act_order": "maybe"}}]},
     ["act_order='maybe'", "valid params"]),
    ("method_param_literal", {"methods": [{"name": "quarot", "params": {"rotation": "haar"}}]},
     ["rotation='haar'", "'hadamard'"]),
    ("method_label_traversal", {"methods": [{"name": "rtn", "label": "../x"}]}, ["'../x'", "valid: letters"]),
    ("method_label_twice", {"methods": ["rtn", "rtn"]}, ["'rtn'", "used twice"]),
    ("scheme_unknown", {"schemes": ["w4a44"]}, ["'w4a44'", "choose one of", "w4a4"]),
    ("scheme_twice", {"schemes": ["w4a4", "w4a4"]}, ["'w4a4'", "listed twice"]),
    ("scheme_format_bits", {"schemes": [{"name": "x", "weights": {"format": "int33"}}]}, ["'int33'", "2..16"]),
    ("scheme_format_unknown", {"schemes": [{"name": "x", "weights": {"format": "fp9_e9m9"}}]},
     ["'fp9_e9m9'", "choose one of"]),
    ("task_unknown", {"tasks": ["wikitext3"]}, ["'wikitext3'", "choose one of", "wikitext2"]),
    ("task_lm_eval_typo", {"tasks": ["arc_eassy"]}, ["'arc_eassy'", "arc_easy"]),
    ("tasks_empty", {"tasks": []}, ["tasks is empty"]),
    ("ppl_seqlen_zero", {"ppl": {"seqlen": 0}}, ["ppl.seqlen", "greater than 0", "got 0"]),
    ("ppl_windows_negative", {"ppl": {"seqlen": 32, "max_windows": -1}}, ["max_windows", "got -1"]),
    ("ppl_seqlen_text", {"ppl": {"seqlen": "long"}}, ["ppl.seqlen", "'long'"]),
    ("ppl_key_typo", {"ppl": {"seqlen": 32, "windows": 1}}, ["'windows'", "valid keys", "max_windows"]),
    ("lm_eval_limit", {"tasks": ["arc_easy"], "lm_eval": {"limit": -1}}, ["lm_eval.limit", "got -1"]),
    ("lm_eval_fewshot", {"tasks": ["arc_easy"], "lm_eval": {"num_fewshot": "x"}}, ["num_fewshot", "'x'"]),
    ("kl_topk", {"tasks": ["kl_wikitext2"], "kl": {"topk": 0}}, ["kl.topk", "got 0"]),
    ("calib_corpus", {**GPTQ, "calib": {"corpus": "c5", "n": 2, "seqlen": 32}}, ["'c5'", "choose one of", "c4"]),
    ("calib_n_zero", {**GPTQ, "calib": {"corpus": "c4", "n": 0, "seqlen": 32}}, ["calib.n", "got 0"]),
    ("calib_seqlen_negative", {**GPTQ, "calib": {"corpus": "c4", "n": 2, "seqlen": -8}}, ["calib.seqlen", "got -8"]),
    ("calib_empty_list", {**GPTQ, "calib": []}, ["calib list is empty"]),
    ("calib_scalar", {**GPTQ, "calib": 5}, ["calib", "5"]),
    ("calib_key_typo", {**GPTQ, "calib": {"corpus": "c4", "samples": 2}}, ["'samples'", "valid keys"]),
    ("seed_negative", {"seeds": [-1]}, ["invalid seed -1", "0 <= seed < 2**63"]),
    ("seed_bool", {"seeds": [True]}, ["invalid seed True", "0 <= seed"]),
    ("seed_overflow", {"seeds": [2 ** 63]}, ["invalid seed 9223372036854775808", "< 2**63"]),
    ("seed_text", {"seeds": ["a"]}, ["invalid seed 'a'"]),
    ("seeds_empty", {"seeds": []}, ["seeds is empty"]),
    ("exclude_value_typo", {"exclude": [{"scheme": "mxfp44"}]}, ["'mxfp44'", "names nothing", "w4a4"]),
    ("exclude_key_typo", {"exclude": [{"schem": "w4a4"}]}, ["'schem'", "choose one of", "scheme"]),
    ("include_model_typo", {"include": [{"model": "nope"}]}, ["'nope'", "names nothing", "tiny-llama"]),
    ("exclude_everything", {"exclude": [{"method": "rtn"}]}, ["matrix is empty"]),
    ("dtype", {"dtype": "float8"}, ["'float8'", "'bfloat16'"]),
    ("threads_zero", {"threads": 0}, ["threads", "got 0"]),
    ("threads_bool", {"threads": True}, ["threads", "True"]),
    ("resources_negative", {"resources": {"num_cpus": -1}}, ["resources.num_cpus", "got -1"]),
    ("resources_key", {"resources": {"gpus": 1}}, ["'gpus'", "'num_gpus'"]),
    ("top_key_typo", {"modles": ["tiny-llama"]}, ["'modles'", "valid keys", "models"]),
    ("paper_traversal", {"paper": "../../x"}, ["'../../x'", "valid: a name"]),
    ("name_with_slash", {"name": "a/b"}, ["'a/b'", "valid: a name"]),
    ("claims_not_a_list", {"claims": "not a list"}, ["claims", "'not a list'"]),
    ("scale_key_typo", {"scales": {"smoke": {"modles": 1}}}, ["scales.smoke.modles", "valid keys"]),
]


def _method_rows():
    """Per registered method: an unknown param, and the first bounded numeric param just outside its range."""
    import annotated_types

    from harness.registry import get_method, list_methods

    rows = []
    for name in list_methods():
        rows.append((f"{name}_unknown_param", {"methods": [{"name": name, "params": {"no_such_knob": 1}}]},
                     ["'no_such_knob'", "valid params"]))
        for field, info in get_method(name).Params.model_fields.items():
            lower = [m for m in info.metadata if isinstance(m, (annotated_types.Ge, annotated_types.Gt))]
            if lower and info.annotation in (int, float):
                bad = (getattr(lower[0], "ge", None) if hasattr(lower[0], "ge") else lower[0].gt) - 1
                rows.append((f"{name}_{field}_out_of_range", {"methods": [{"name": name, "params": {field: bad}}]},
                             [f"{field}={bad}", "greater than"]))
                break
    return rows


def one_line_error(code, err: str, words) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("ptqbench: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def cli(argv) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, err.getvalue()


ALL_SPEC_ROWS = SPEC_ROWS + _method_rows()


@pytest.mark.parametrize("row", ALL_SPEC_ROWS, ids=[r[0] for r in ALL_SPEC_ROWS])
def test_bad_spec_value(tmp_path, row):
    _, patch, words = row
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, **patch}))
    code, err = cli(["run", path, "--dry-run", "--results-dir", tmp_path / "res"])
    one_line_error(code, err, [str(path)] + words if "does not exist" not in words else words)


# ---- a spec file that is not a good YAML mapping -------------------------------------------------------
def _bomb() -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    return ("\n".join(lines) + "\nname: bomb\n").encode()


RAW_ROWS = [
    ("yaml_syntax", b"name: x\nmodels: [tiny-llama\n", ["spec.yaml"]),
    ("yaml_duplicate_key", b"name: x\nmodels: [tiny-llama]\nmodels: [tiny-qwen2]\n", ["spec.yaml:3", "models"]),
    ("yaml_not_utf8", b"name: x\xff\xfe\n", ["spec.yaml", "UTF-8"]),
    ("yaml_alias_bomb", _bomb(), ["spec.yaml", "aliases"]),
    ("yaml_top_level_list", b"- models\n- methods\n", ["spec.yaml", "mapping"]),
    ("yaml_empty", b"", ["spec.yaml"]),
    ("yaml_scalar", b"just a string\n", ["spec.yaml", "mapping"]),
    ("yaml_python_tag", b"name: !!python/object/apply:os.system [echo hi]\n", ["spec.yaml"]),
]


@pytest.mark.parametrize("row", RAW_ROWS, ids=[r[0] for r in RAW_ROWS])
def test_bad_spec_file(tmp_path, row):
    _, content, words = row
    path = tmp_path / "spec.yaml"
    path.write_bytes(content)
    code, err = cli(["run", path, "--dry-run", "--results-dir", tmp_path / "res"])
    one_line_error(code, err, words)


# ---- command lines ---------------------------------------------------------------------------------------
def _cli_rows():
    spec = "{tmp}/spec.yaml"
    return [
        ("unknown_command", ["frobnicate"], ["'frobnicate'", "choose from", "'run'"]),
        ("list_unknown_kind", ["list", "colours"], ["'colours'", "'methods'"]),
        ("run_no_spec", ["run"], ["required: spec"]),
        ("run_unknown_flag", ["run", spec, "--bogus"], ["--bogus"]),
        ("run_missing_spec", ["run", "{tmp}/missing.yaml"], ["missing.yaml", "No such file"]),
        ("run_spec_is_dir", ["run", "{tmp}"], ["Is a directory"]),
        ("run_device_tpu", ["run", spec, "--device", "tpu", "--dry-run"], ["'tpu'", "cpu, cuda, cuda:N, mps"]),
        ("run_device_cuda_absent", ["run", spec, "--device", "cuda:7"], ["'cuda:7'", "use cpu"]),
        ("run_executor", ["run", spec, "--executor", "slurm", "--dry-run"], ["'slurm'", "local, ray"]),
        ("run_scale", ["run", spec, "--scale", "huge", "--dry-run"], ["'huge'", "smoke"]),
        ("run_address_without_ray", ["run", spec, "--address", "1.2.3.4:6379"], ["'1.2.3.4:6379'", "--executor ray"]),
        ("run_results_dir_is_file", ["run", spec, "--results-dir", "{tmp}/afile"], ["afile", "not usable"]),
        ("run_results_runs_is_file", ["run", spec, "--results-dir", "{tmp}/runsfile"], ["runsfile/runs", "not usable"]),
        ("show_unknown_run", ["show", "zzzz", "--results-dir", "{tmp}/res"], ["'zzzz'", "choose one of"]),
        ("show_traversal", ["show", "../../outside", "--results-dir", "{tmp}/res"], ["'../../outside'", "valid: a name"]),
        ("show_results_is_file", ["show", "abc", "--results-dir", "{tmp}/afile"], ["afile", "not a directory"]),
        ("table_results_is_file", ["table", "--results-dir", "{tmp}/afile"], ["afile", "not a directory"]),
        ("table_unknown_metric", ["table", "--metric", "accc", "--results-dir", "{tmp}/recorded"], ["'accc'", "ppl"]),
        ("table_unknown_spec", ["table", "--spec", "nospec", "--results-dir", "{tmp}/recorded"], ["'nospec'", "rec"]),
        ("reproduce_unknown_paper", ["reproduce", "nosuchpaper"], ["'nosuchpaper'", "torq"]),
        ("reproduce_traversal", ["reproduce", "../../evilpaper"], ["'../../evilpaper'", "torq"]),
        ("reproduce_scale", ["reproduce", "torq", "--scale", "huge", "--results-dir", "{tmp}/r"], ["'huge'", "smoke"]),
        ("report_unknown_paper", ["report", "nosuchpaper"], ["'nosuchpaper'", "torq"]),
        ("site_results_is_file", ["site", "--results-dir", "{tmp}/afile"], ["afile"]),
        ("export_to_a_directory", ["export", "{tmp}", "--results-dir", "{tmp}/recorded"], ["Is a directory"]),
    ]


CLI_ROWS = _cli_rows()


@pytest.fixture
def cli_tmp(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**BASE, "scales": {"smoke": {"seeds": [0]}}}))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "runsfile").mkdir()
    (tmp_path / "runsfile" / "runs").write_text("x")
    from harness.store import Store

    Store(tmp_path / "recorded").write({"run_id": "rec1", "status": "done", "spec": "rec", "model": "m",
                                         "task": "wikitext2", "method": "fp", "method_label": "fp", "scheme": None,
                                         "metrics": {"ppl": 10.0}, "main_metric": "ppl"})
    return tmp_path


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_bad_command_line(cli_tmp, row):
    _, argv, words = row
    code, err = cli([a.format(tmp=cli_tmp) for a in argv])
    one_line_error(code, err, [w.format(tmp=cli_tmp) for w in words])


# ---- the Python API -------------------------------------------------------------------------------------
def _api_rows():
    from harness.data import calibration_windows, load_eval_text, load_rows
    from harness.devices import check_device
    from harness.executors import get_executor
    from harness.formats import get_format
    from harness.models import load_model
    from harness.quant import get_scheme
    from harness.registry import get_method
    from harness.store import Store

    return [
        ("get_method", lambda tmp: get_method("quarott"), ["'quarott'", "choose one of", "quarot"]),
        ("get_scheme", lambda tmp: get_scheme("w4a44"), ["'w4a44'", "w4a4"]),
        ("get_scheme_group", lambda tmp: get_scheme({"weights": {"format": "int4", "group_size": -3}}),
         ["group_size -3", "valid"]),
        ("get_format_bits", lambda tmp: get_format("int33"), ["'int33'", "2..16"]),
        ("get_format_fp", lambda tmp: get_format("fp9_e9m9"), ["'fp9_e9m9'", "choose one of"]),
        ("get_format_mx", lambda tmp: get_format("mxfp5"), ["'mxfp5'", "mxfp4"]),
        ("get_format_empty", lambda tmp: get_format(""), ["''", "choose one of"]),
        ("load_model_unknown", lambda tmp: load_model("nope-model"), ["'nope-model'", "tiny-llama"]),
        ("load_model_dtype", lambda tmp: load_model("tiny-llama", dtype="float9"), ["'float9'", "bfloat16"]),
        ("load_model_device", lambda tmp: load_model("tiny-llama", device="tpu"), ["'tpu'", "cpu"]),
        ("load_rows_dataset", lambda tmp: load_rows("wikitext9", "test"), ["'wikitext9'", "wikitext2"]),
        ("load_rows_split", lambda tmp: load_rows("wikitext2", "train9"), ["'train9'", "test, validation"]),
        ("load_eval_text", lambda tmp: load_eval_text("c5"), ["'c5'", "wikitext2"]),
        ("calibration_windows_corpus", lambda tmp: calibration_windows(None, "c5", n=2, seqlen=8), ["'c5'", "c4"]),
        ("calibration_windows_seed", lambda tmp: calibration_windows(None, "c4", n=2, seqlen=8, seed=-1), ["-1"]),
        ("store_run_id", lambda tmp: Store(tmp).write({"run_id": "../x", "status": "done"}), ["'../x'", "valid"]),
        ("store_status", lambda tmp: Store(tmp).write({"run_id": "abc", "status": "maybe"}), ["'maybe'", "done, failed"]),
        ("store_find", lambda tmp: Store(tmp).find("zz"), ["'zz'", "choose one of"]),
        ("store_calib_key", lambda tmp: Store(tmp).calib_dir("../k"), ["'../k'"]),
        ("check_device", lambda tmp: check_device("tpu"), ["'tpu'", "cuda:N"]),
        ("get_executor", lambda tmp: get_executor("slurm"), ["'slurm'", "local, ray"]),
        ("gptq_damp", lambda tmp: get_method("gptq").validate_params({"damp": -1}), ["damp=-1", "greater than 0"]),
        ("torq_samples", lambda tmp: get_method("torq").validate_params({"samples": -1}), ["samples=-1"]),
        ("hcast_block", lambda tmp: get_method("hcast").validate_params({"block": 0}), ["block=0"]),
        ("spinquant_steps", lambda tmp: get_method("spinquant").validate_params({"steps": -5}), ["steps=-5"]),
        ("nan_param", lambda tmp: get_method("gptq").validate_params({"damp": math.nan}), ["damp=nan"]),
    ]


API_ROWS = _api_rows()


@pytest.mark.parametrize("row", API_ROWS, ids=[r[0] for r in API_ROWS])
def test_bad_api_call(tmp_path, row):
    _, call, words = row
    with pytest.raises(PtqbenchError) as info:
        call(tmp_path)
    text = str(info.value)
    assert "\n" not in text and len(text) < 2000, text
    for word in words:
        assert word in text, (word, text)


def test_the_table_has_at_least_100_bad_inputs():
    assert len(ALL_SPEC_ROWS) + len(RAW_ROWS) + len(CLI_ROWS) + len(API_ROWS) >= 100
    ids = [r[0] for r in ALL_SPEC_ROWS + RAW_ROWS + CLI_ROWS + API_ROWS]
    assert len(ids) == len(set(ids))


def test_no_row_is_a_valid_input(tmp_path):
    """The base spec itself runs (dry) fine: every failure above comes from the one changed key."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    code, err = cli(["run", path, "--dry-run", "--results-dir", tmp_path / "res"])
    assert code == 0, err
    assert Path(path).exists()
