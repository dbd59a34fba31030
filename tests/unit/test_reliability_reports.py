"""Reliability probe regressions: user-supplied text is escaped in every HTML/LaTeX output (defect 18)."""
from __future__ import annotations

import pandas as pd

from harness.report.leaderboard import build_leaderboard, latex_escape

EVIL = "<img src=x onerror=alert(1)>"
EVIL_TEX = r"x\input{/etc/passwd}_&%$#"


def frame(label=EVIL, scheme="s<script>", model="m<i>", task="t&<b>"):
    rows = []
    for method, sch, seed, value in [("fp", "w16a16", 0, 20.0), (label, scheme, 0, 30.0), (label, scheme, 1, 32.0),
                                     ("rtn", scheme, 0, 40.0)]:
        rows.append({"model": model, "task": task, "method_label": method, "method": "x", "scheme": sch, "seed": seed,
                     "status": "done", "metric": "ppl", "value": value, "protocol.seqlen": 512, "error": None,
                     "run_id": f"r{len(rows)}"})
    return pd.DataFrame(rows)


def test_leaderboard_html_escapes_labels_but_keeps_bold():
    board = build_leaderboard(frame(), "ppl", task="t&<b>", model="m<i>")
    out = board.to_html()
    assert EVIL not in out and "<script>" not in out and "<i>" not in out
    assert "&lt;img src=x onerror=alert(1)&gt;" in out
    assert "<b>31.000 ± 1.414 (+11.000)</b>" in out  # intended markup still works


def test_leaderboard_latex_escapes_labels_but_keeps_bold():
    board = build_leaderboard(frame(label=EVIL_TEX, scheme="w_4", model="m", task="t"), "ppl", task="t", model="m")
    out = board.to_latex()
    assert r"\input" not in out and "w_4" not in out
    assert latex_escape(EVIL_TEX) in out and r"w\_4" in out
    assert r"\textbf{31.000 $\pm$ 1.414 (+11.000)}" in out


def test_markdown_unchanged():
    board = build_leaderboard(frame(label="gptq", scheme="mxfp4", model="m", task="t"), "ppl", task="t", model="m")
    assert "**31.000 ± 1.414 (+11.000)**" in board.to_markdown()


def test_site_escapes_everything(tmp_path):
    from harness.report.site import build_site

    page = build_site(frame(), tmp_path / "site").read_text()
    assert EVIL not in page and "<script>alert" not in page and "s<script>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_paper_report_html_escapes_everything(tmp_path):
    from harness.report.paper import write_paper_report

    spec = {"paper": "p<script>x</script>", "title": EVIL, "notes": EVIL,
            "reported": [{"method": EVIL, "ppl": 1.0}], "claims": []}
    write_paper_report(spec, frame(), tmp_path / "out", scale="<b>s</b>")
    page = (tmp_path / "out" / "report.html").read_text()
    assert EVIL not in page and "<script>x" not in page and "<b>s</b>" not in page
