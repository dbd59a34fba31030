"""What a new user hit (#20): a clone without the data mirror, missing datasets, README commands."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.cli import main
from harness.store import Store

ROOT = Path(__file__).resolve().parents[2]
SPEC = ("name: nu\nmodels: [tiny-llama]\nmethods: [fp, {name: gptq, params: {block_size: 32}}]\nschemes: [w4a4]\n"
        "tasks: [wikitext2, arc_easy]\nppl: {seqlen: 32, max_windows: 1}\nlm_eval: {limit: 2}\n"
        "calib: {corpus: c4, n: 2, seqlen: 32}\n")


def run(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    code = main(["run", str(spec), "--results-dir", str(tmp_path / "res"), "--no-track"])
    return code, capsys.readouterr().err


def test_a_mirror_without_a_dataset_stops_before_the_first_cell(tmp_path, monkeypatch, capsys):
    (tmp_path / "mirror" / "wikitext2").mkdir(parents=True)
    (tmp_path / "mirror" / "wikitext2" / "wiki.test.raw").write_text(" = A = \n")
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path / "mirror"))
    code, err = run(tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "lacks" in lines[0] and "arc_easy" in lines[0] and "c4 (train)" in lines[0] and "available there: wikitext2" in lines[0]
    assert list(Store(tmp_path / "res").records()) == []  # no cell ran (no model loaded, no transform applied)


def test_no_mirror_and_no_hub_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """A clone without the mirror retried the hub per cell and failed every cell after minutes."""
    monkeypatch.setenv("PTQBENCH_DATA_DIR", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "hub is unreachable" in lines[0] and "PTQBENCH_DATA_DIR" in lines[0], err
    assert "set but empty" in lines[0] and "unset" not in lines[0], err  # says what the user did
    assert list(Store(tmp_path / "res").records()) == []


def test_readme_ray_example_names_a_scale():
    """`ptqbench run experiments/smoke.yaml --executor ray` ran the full scale."""
    readme = (ROOT / "README.md").read_text()
    for line in readme.splitlines():
        if re.search(r"ptqbench run \S+\.yaml", line) and "smoke.yaml" in line:
            assert "--scale" in line, line


def test_readme_commands_use_the_venv_or_say_how():
    """`ptqbench` is not on PATH after `make setup`: the README says to activate the venv."""
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme


def test_loading_a_model_prints_no_known_noise():
    """(#20.5) Every command printed torchao's `Failed to load ..._C_mxfp8.so` and torch's pytree warning twice."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from harness.models import load_model; load_model('tiny-llama')"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Failed to load" not in out.stderr and "register_constant" not in out.stderr, out.stderr


def test_a_matrix_shows_cell_k_of_n_its_stage_elapsed_and_eta(tmp_path, monkeypatch, capsys):
    """(#20.4) Long steps were silent: no counter per cell, nothing during a 331 s evaluation."""
    monkeypatch.setenv("PTQBENCH_PROGRESS", "0")  # a log, not a terminal: one line per stage and per run
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: p\nmodels: [tiny-llama]\nmethods: [fp, rtn]\nschemes: [w4a4]\ntasks: [wikitext2]\n"
                    "ppl: {seqlen: 32, max_windows: 1}\n")
    assert main(["run", str(spec), "--results-dir", str(tmp_path / "res"), "--no-track"]) == 0
    err = capsys.readouterr().err
    for stage in ("load model", "calibrate", "apply", "evaluate wikitext2"):
        assert f"[cell 2/2] tiny-llama | rtn | w4a4 | seed None: {stage}" in err, err
    assert re.search(r"^\[1/2 \d\d:\d\d elapsed, ETA \d\d:\d\d\] \S+ tiny-llama \| fp", err, re.M), err
    assert re.search(r"^\[2/2 \d\d:\d\d elapsed, ETA 00:00\]", err, re.M), err


def test_cache_du_and_prune(tmp_path, capsys):
    """(#20.7) results/cache grew to 3.2 GB with no way to see or prune it."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: c\nmodels: [tiny-llama]\nmethods: [{name: gptq, params: {block_size: 32}}]\n"
                    "schemes: [w4a4, w8a8]\ntasks: [wikitext2]\nppl: {seqlen: 32, max_windows: 1}\n"
                    "calib: {corpus: c4, n: 2, seqlen: 32}\n")
    res = str(tmp_path / "res")
    assert main(["run", str(spec), "--results-dir", res, "--no-track"]) == 0
    err = capsys.readouterr().err
    assert "calibration cache:" in err and "in 2 states" in err, err
    store = Store(res)
    assert len(store.calib_entries()) == 2 and all(e["used"] and e["bytes"] > 0 for e in store.calib_entries())
    assert main(["cache", "du", "--results-dir", res]) == 0
    out = capsys.readouterr().out
    assert "2 calibration states" in out and "gptq" in out and "used" in out
    assert main(["cache", "prune", "--results-dir", res]) == 2  # says what it would remove: one line
    assert "--unused" in capsys.readouterr().err
    victim = next(r for r in store.records() if r["scheme"] == "w8a8")
    store.path(victim["run_id"]).unlink()  # its calibration is now unused
    assert main(["cache", "prune", "--unused", "--results-dir", res]) == 0
    assert "removed 1 calibration states" in capsys.readouterr().out
    assert [e["used"] for e in store.calib_entries()] == [True]
    assert main(["cache", "prune", "--all", "--results-dir", res]) == 0
    assert store.calib_entries() == []


@pytest.mark.parametrize("kind, line", [("formats", "mxfp4 "), ("schemes", "w4a4kv4 ")])
def test_list_formats_and_schemes_describe_each_entry(capsys, kind, line):
    """(#20.8) They printed bare names; `list methods` gives a line each."""
    assert main(["list", kind]) == 0
    out = capsys.readouterr().out.splitlines()
    entry = next(o for o in out if o.startswith(line))
    assert len(entry.split()) > 3, entry
    if kind == "schemes":
        assert "W int4" in entry and "KV" in entry


def test_show_says_when_it_truncates_the_known_ids(tmp_path, capsys):
    store = Store(tmp_path / "res")
    for i in range(33):
        store.write({"run_id": f"r{i:02d}", "status": "done", "metrics": {}})
    assert main(["show", "zz", "--results-dir", str(tmp_path / "res")]) == 2
    assert "and 13 more" in capsys.readouterr().err


def test_paper_report_html_keeps_the_notes_legend_and_calibration(tmp_path):
    """(#20.6) The HTML report dropped the spec's notes and the verdict legend, showed backticks literally and
    never said which calibration set the numbers depend on."""
    from harness.report.paper import write_paper_report
    from harness.store import load_results

    store = Store(tmp_path / "res")
    store.write({"run_id": "a", "status": "done", "spec": "s", "model": "m", "task": "wikitext2", "method": "gptq",
                 "method_label": "gptq", "scheme": "w4a4", "seed": 0, "calib": {"corpus": "c4", "n": 16, "seqlen": 256},
                 "protocol": {"seqlen": 256, "max_windows": 4}, "metrics": {"ppl": 12.0}, "main_metric": "ppl"})
    spec = {"paper": "toy", "title": "Toy", "notes": "Weights come from a `Q4_1` GGUF.\n\nSecond *paragraph*.",
            "claims": [{"id": "c1", "says": "gptq is fine", "check": "ppl(gptq, w4a4) < 20"}]}
    write_paper_report(spec, load_results(store.root), tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<code>Q4_1</code>" in page and "`" not in page.split("<h2>Claims")[0]
    assert "<em>paragraph</em>" in page and "inconclusive" in page and "c4 16 x 256 tokens" in page
    assert "draws no random numbers" in page
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Calibration: c4 16 x 256 tokens." in md


def test_a_perplexity_check_says_the_papers_number_is_an_accuracy():
    """(#20.6) A claim checked on perplexity showed the paper's accuracy as its paper column, unlabelled."""
    from harness.report.claims import ClaimResult
    from harness.report.paper import paper_column

    result = ClaimResult("c", "ppl(torq, mxfp4) < ppl(rtn, mxfp4)", "reproduced",
                         paper={"model": "Qwen3-32B", "avg_acc": {"rtn": 38.4, "torq": 73.63}})
    assert paper_column(result).startswith("(accuracy; checked here on perplexity)")
    result.paper = {"wikitext2_ppl": 5.5}
    assert not paper_column(result).startswith("(")


def test_a_diverged_run_is_marked_on_the_format_plot(tmp_path):
    """(#20.6) Plots left a diverged run blank."""
    from harness.report import plots
    from harness.store import load_results

    store = Store(tmp_path / "res")
    for rid, method, status, ppl in (("a", "fp", "done", 20.0), ("b", "rtn", "failed", 4.7e4)):
        store.write({"run_id": rid, "status": status, "model": "m", "task": "wikitext2", "method": method,
                     "method_label": method, "scheme": "w4a4", "seed": 0, "metrics": {"ppl": ppl},
                     "error": "[eval] RunFailure: diverged: ppl=4.7e+04" if status == "failed" else None,
                     "protocol": {"seqlen": 256, "max_windows": 4}})
    seen = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.text
    matplotlib.axes.Axes.text = lambda self, *a, **k: seen.append(a[2]) or original(self, *a, **k)
    try:
        plots.format_bars(load_results(store.root), "ppl", tmp_path / "plots", task="wikitext2", model="m")
    finally:
        matplotlib.axes.Axes.text = original
    assert any("diverged: rtn / w4a4 = 4.7e+04" in t for t in seen), seen
