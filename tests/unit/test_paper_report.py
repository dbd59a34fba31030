from __future__ import annotations

import json

from test_leaderboard import frame

from harness.report.paper import write_paper_report

SPEC = {
    "paper": "demo",
    "title": "A demo paper",
    "claims": [
        {"id": "gptq_beats_rtn", "says": "GPTQ beats RTN under MXFP4", "check": "ppl(gptq, mxfp4) < ppl(rtn, mxfp4)",
         "paper": {"rtn": 9.1, "gptq": 8.2}},
        {"id": "gptq_int4", "check": "ppl(gptq, int4) < ppl(rtn, int4)"},
        {"id": "wrong_way", "check": "ppl(rtn, mxfp4) < ppl(gptq, mxfp4)"},
    ],
    "reported": [{"model": "Llama-2-7B", "method": "gptq", "scheme": "mxfp4", "wikitext2_ppl": 8.2}],
}


def test_report_has_claims_tables_and_failures(tmp_path):
    md = write_paper_report(SPEC, frame(), tmp_path).read_text()
    assert "✅ reproduced" in md and "⏸ not run" in md and "❌ contradicted" in md
    assert "Llama-2-7B" in md and "## Failed runs" in md and "seqlen=512" in md
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert [c["verdict"] for c in claims] == ["reproduced", "not run", "contradicted"]
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
