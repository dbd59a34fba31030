"""`ptqbench reproduce` end to end on a tiny paper spec: runs the matrix, writes the report with verdicts."""
from __future__ import annotations

import json

from harness.cli import main

PAPER = """
paper: demo
title: "A demo paper"
models: [tiny-llama]
methods: [fp, rtn]
schemes: [w4a4]
tasks: [wikitext2]
ppl: {seqlen: 32, max_windows: 2}
scales:
  smoke: {ppl: {seqlen: 32, max_windows: 1}}
claims:
  - {id: rtn_costs, says: "W4A4 RTN is worse than FP", check: "ppl(rtn, w4a4) > ppl(fp, w16a16)"}
  - {id: missing, check: "ppl(gptq, w4a4) < ppl(rtn, w4a4)"}
"""


def test_reproduce_runs_the_spec_and_writes_the_report(tmp_path, monkeypatch):
    (tmp_path / "experiments" / "papers").mkdir(parents=True)
    (tmp_path / "experiments" / "papers" / "demo.yaml").write_text(PAPER)
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "demo", "--scale", "smoke", "--results-dir", str(tmp_path / "res"), "--no-track"]) == 0
    report = tmp_path / "res" / "papers" / "demo"
    claims = {c["id"]: c["verdict"] for c in json.loads((report / "claims.json").read_text())}
    # the verdict follows the recorded numbers (a random tiny model may go either way)
    runs = [json.loads(f.read_text()) for f in (tmp_path / "res" / "runs").glob("*.json")]
    ppl = {r["method"]: r["metrics"]["ppl"] for r in runs}
    assert claims == {"rtn_costs": "reproduced" if ppl["rtn"] > ppl["fp"] else "contradicted", "missing": "not run"}
    assert "seqlen=32" in (report / "report.md").read_text()
    # a rerun resumes: nothing left to run, same report
    assert main(["reproduce", "demo", "--scale", "smoke", "--results-dir", str(tmp_path / "res"), "--no-track"]) == 0


def test_a_run_recorded_by_another_spec_counts_under_this_specs_label(tmp_path, monkeypatch):
    """Run ids do not hash labels: a second paper reuses the first one's runs under its own labels."""
    papers = tmp_path / "experiments" / "papers"
    papers.mkdir(parents=True)
    (papers / "demo.yaml").write_text(PAPER)
    (papers / "other.yaml").write_text(PAPER.replace("paper: demo", "paper: other")
                                       .replace("methods: [fp, rtn]", "methods: [fp, {name: rtn, label: plain_rtn}]")
                                       .replace("ppl(rtn, w4a4) > ppl(fp, w16a16)", "ppl(plain_rtn, w4a4) > 0"))
    monkeypatch.chdir(tmp_path)
    res = ["--scale", "smoke", "--results-dir", str(tmp_path / "res"), "--no-track"]
    assert main(["reproduce", "demo", *res]) == 0
    runs_before = sorted(p.name for p in (tmp_path / "res" / "runs").glob("*.json"))
    assert main(["reproduce", "other", *res]) == 0
    assert sorted(p.name for p in (tmp_path / "res" / "runs").glob("*.json")) == runs_before  # nothing re-run
    claims = {c["id"]: c["verdict"] for c in json.loads((tmp_path / "res" / "papers" / "other" / "claims.json").read_text())}
    assert claims["rtn_costs"] == "reproduced"


def test_unknown_paper_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "nosuchpaper"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nosuchpaper" in err and "\n" not in err
