"""The paper report's HTML page: claims per model with intervals and verdict badges, leaderboards with
intervals, protocols; rendered in headless Chromium (screenshot taken), its text free of artefacts."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from harness.report.paper import write_paper_report

TOKENS = 255


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _run(model, method, scheme, nll, seed=0, status="done"):
    nll = np.asarray(nll, dtype=np.float64)
    value = math.exp(nll.sum() / (len(nll) * TOKENS))
    return {"run_id": f"{model}-{method}-{scheme}-{seed}", "model": model, "task": "wikitext2", "method": method,
            "scheme": scheme, "seed": seed, "status": status, "metric": "ppl", "value": value,
            "error": None if status == "done" else f"[eval] RunFailure: diverged: ppl={value:.4g} on wikitext2 exceeds 10000",
            "protocol.seqlen": 256, "protocol.windows": len(nll), "protocol.tokens_predicted": len(nll) * TOKENS,
            "protocol.bos_per_window": model.startswith("gemma"), "info.window_nll": json.dumps(nll.tolist())}


def results() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model in ("smollm2-135m", "gemma3-270m"):
        base = rng.uniform(2.5, 4.5, 16) * TOKENS
        rows += [_run(model, "fp", "w16a16", base), _run(model, "rtn", "w4a4kv4", base * 1.3),
                 _run(model, "rtn", "w8a8", base * 1.001)]
        rows += [_run(model, "quarot", "w4a4kv4", base * f, seed=s) for s, f in enumerate((1.05, 1.06, 1.055))]
    rows.append(_run("gemma3-270m", "spinquant", "w4a4kv4", rng.uniform(9, 10, 16) * TOKENS, status="failed"))
    return pd.DataFrame(rows)


SPEC = {
    "paper": "demo", "title": "Demo: rotations at W4A4",
    "notes": "A demo with `code` and *emphasis*.",
    "claims": [
        {"id": "rotation_restores", "origin": "paper", "says": "Rotation restores W4A4",
         "check": "ppl(quarot, w4a4kv4) < ppl(rtn, w4a4kv4)", "paper": {"model": "Llama-2-7B", "wikitext2_ppl": {"fp16": 5.47, "quarot": 6.1}}},
        {"id": "w8a8_lossless", "origin": "baseline", "says": "8-bit is lossless",
         "check": "approx(ppl(rtn, w8a8), ppl(fp, w16a16), rel=0.02)"},
        {"id": "spin", "origin": "hypothesis", "says": "SpinQuant beats QuaRot", "check": "ppl(spinquant, w4a4kv4) < ppl(quarot, w4a4kv4)"},
    ],
    "reported": [{"model": "Llama-2-7B", "method": "QuaRot", "wikitext2_ppl": 6.1, "avg_zero_shot": None}],
}


def test_claims_are_per_model_with_intervals_and_badges(tmp_path):
    write_paper_report(SPEC, results(), tmp_path)
    page = (tmp_path / "report.html").read_text()
    claims = json.loads((tmp_path / "claims.json").read_text())
    assert {(c["id"], c["model"]) for c in claims} == {(i, m) for i in ("rotation_restores", "w8a8_lossless", "spin")
                                                      for m in ("smollm2-135m", "gemma3-270m")}
    verdicts = {(c["id"], c["model"]): c["verdict"] for c in claims}
    assert verdicts[("rotation_restores", "gemma3-270m")] == "reproduced"
    assert verdicts[("w8a8_lossless", "smollm2-135m")] == "reproduced"
    assert verdicts[("spin", "gemma3-270m")] == "contradicted"  # the diverged run counts with its value
    assert page.count("class='badge ok'") >= 3 and "class='badge bad'" in page
    assert "<th>gemma3-270m</th><th>smollm2-135m</th>" in page  # one column per model
    assert "ratio" in page and "95%" in page and "baseline check" in page and "our hypothesis" in page
    assert "model: Llama-2-7B; wikitext2_ppl: fp16 5.47, quarot 6.1" in page  # no Python dict
    assert "<details><summary>Protocol of every number" in page
    md = (tmp_path / "report.md").read_text()
    assert "[" in md and "ratio" in md and "| origin" in md


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_page_renders_without_artefacts_or_missing_glyphs(tmp_path):
    write_paper_report(SPEC, results(), tmp_path)
    page = (tmp_path / "report.html").as_uri()
    base = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "shot.png"
    proc = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2400", page],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<style>.*?</style>", " ", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    assert "\ufffd" not in text
    assert not re.search(r"\bnan\b|\bNaN\b|\bNone\b|\{'", text), re.findall(r".{30}(?:\bnan\b|\bNaN\b|\bNone\b|\{').{30}", text)
    assert "reproduced" in text and "contradicted" in text and "gemma3-270m" in text
    # every character on the page has a glyph in an installed font (no empty boxes)
    if shutil.which("fc-list"):
        for ch in sorted({c for c in text if ord(c) > 127}):
            fonts = subprocess.run(["fc-list", f":charset={ord(ch):x}"], capture_output=True, text=True).stdout
            assert fonts.strip(), f"no installed font has a glyph for {ch!r} (U+{ord(ch):04X})"


def test_point_value_comparisons_say_they_have_no_interval(tmp_path):
    df = results()
    extra = [dict(df.iloc[0], method="torq", metric=m, value=v, **{"info.window_nll": None})
             for m, v in (("method.err_after", 1.0), ("method.err_before", 2.0))]
    spec = {"paper": "p", "claims": [{"id": "err", "check": "metric(method.err_after, torq, w16a16) < metric(method.err_before, torq, w16a16)"}]}
    write_paper_report(spec, pd.concat([df, pd.DataFrame(extra)], ignore_index=True), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "ratio 0.5 (point values, no interval)" in page and "0.5 to 0.5" not in page
