"""A paper's reproduction report: its tables next to ours, and the claims table with verdicts.

Input: the paper spec (the YAML as a dict: `paper`, `title`, `claims`, optional `reported`) and the tidy
results DataFrame of its runs. Output: `<out_dir>/report.md`, `report.html` and `claims.json`.
"""
from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report.claims import ClaimResult, ResultLookup, evaluate_claim
from harness.report.leaderboard import headline_leaderboards, method_column

VERDICT_MARK = {"reproduced": "✅ reproduced", "contradicted": "❌ contradicted",
                "inconclusive": "➖ inconclusive", "not run": "⏸ not run"}


def _ppl_task(df: pd.DataFrame) -> str | None:
    tasks = df.loc[df["metric"] == "ppl", "task"].dropna().unique() if not df.empty else []
    return "wikitext2" if "wikitext2" in tasks else (sorted(tasks)[0] if len(tasks) else None)


def check_claims(spec: dict[str, Any], df: pd.DataFrame) -> list[ClaimResult]:
    """Every claim, checked on each model of the runs (one result per model), or on the model it names.

    Values of different models are never averaged into one verdict: a full scale lists 2-3 models."""
    models = sorted(df["model"].dropna().unique()) if not df.empty else []
    results = []
    for claim in spec.get("claims") or []:
        for model in [claim["model"]] if claim.get("model") else (models or [None]):
            lookup = ResultLookup(df, default_ppl_task=_ppl_task(df), default_model=model)
            results.append(evaluate_claim(claim["check"], lookup, claim_id=claim.get("id", ""),
                                          says=claim.get("says", ""), paper=claim.get("paper"),
                                          tolerance=float(claim.get("tolerance", 0.0)), model=model))
    return results


def _fmt_values(result: ClaimResult) -> str:
    from harness.report.page import value_lines

    return "; ".join(value_lines(result))


def _fmt_paper(value: Any) -> str:
    from harness.report.page import text_of

    return text_of(value)


def paper_column(result: ClaimResult) -> str:
    """The paper's number, saying so when it is another metric than the one checked (accuracy vs perplexity)."""
    import re

    text = _fmt_paper(result.paper)
    checked = set(re.findall(r"\b(ppl|acc|kl)\s*\(", result.check))
    if checked == {"ppl"} and "acc" in text.lower() and "ppl" not in text.lower():
        return f"(accuracy; checked here on perplexity) {text}"
    return text


def claims_table(results: list[ClaimResult], spec: dict[str, Any] | None = None) -> pd.DataFrame:
    origins = {c.get("id", ""): c.get("origin", "") for c in (spec or {}).get("claims") or []}
    return pd.DataFrame([
        {"claim": r.id, "origin": origins.get(r.id) or "–", "model": r.model or "–", "says": r.says,
         "check": f"`{r.check}`", "paper": paper_column(r), "ours (95% intervals)": _fmt_values(r),
         "verdict": VERDICT_MARK.get(r.verdict, r.verdict)}
        for r in results
    ])


def reported_table(spec: dict[str, Any]) -> pd.DataFrame | None:
    """The paper's own numbers (`reported:` rows of the spec) as a table."""
    rows = spec.get("reported") or []
    return pd.DataFrame(rows) if rows else None


def leaderboards(df: pd.DataFrame) -> list:
    return headline_leaderboards(df)


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    cols = [c for c in ("method", "scheme", "task", "seed", "error") if c in df.columns]
    return df[df["status"] != "done"][cols].drop_duplicates()


LEGEND = ("Verdicts at 95%: *reproduced* when the claim holds over the whole bootstrap interval of the compared "
          "quantity, *contradicted* when its opposite does, *inconclusive* when the interval straddles the boundary; "
          "*not run* when a run is missing or failed (a diverged run, whose perplexity was recorded, counts with its "
          "value, marked \"(diverged)\"; a comparison of two diverged runs is inconclusive). Perplexities are resampled over their evaluation windows (2000 resamples, "
          "the same for every run on the same windows, so comparisons are paired) and over seed runs; brackets are "
          "95% intervals. Claims are marked by origin: the paper's claim, a baseline check, or our hypothesis. "
          "Smoke-scale verdicts come from small models and short evaluations: they test the pipeline and the "
          "direction of an effect, not the paper's numbers.")
SEED_NOTE = "Seed `–` (null in the records): the method draws no random numbers, so it runs once whatever the seeds."


def inline_html(text: str) -> str:
    """Escaped text with the Markdown a spec's notes use: `code` and *emphasis*; paragraphs on blank lines."""
    import re

    out = html.escape(str(text).strip())
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*([^*\s][^*]*)\*", r"<em>\1</em>", out)
    return "".join(f"<p>{p.strip()}</p>" for p in re.split(r"\n\s*\n", out) if p.strip())


KV_COLUMNS = {"kv_cache.key_bits": "K bits", "kv_cache.value_bits": "V bits",
              "kv_cache.bytes_per_token": "bytes / token", "kv_cache.compression_vs_16bit": "× vs 16-bit",
              "kv_cache.context": "context"}


def kv_cache_table(df: pd.DataFrame) -> pd.DataFrame | None:
    """What each run's KV cache stores (harness.kv.kv_accounting), for the runs that quantize it; None if none do."""
    if df.empty or "kv_cache.bits_per_element" not in df.columns:
        return None
    rows = df[(df["status"] == "done") & (df["kv_cache.bits_per_element"] < 16)]
    if rows.empty:
        return None
    mcol = method_column(rows)
    cols = [c for c in KV_COLUMNS if c in rows.columns]
    table = rows[["model", mcol, "scheme", *cols]].drop_duplicates().rename(columns={mcol: "method", **KV_COLUMNS})
    return table.sort_values(["model", "method", "scheme"]).reset_index(drop=True)


def calibration_line(df: pd.DataFrame) -> str:
    """The calibration sets the numbers depend on (corpus, windows x tokens), or '' when nothing calibrated."""
    cols = ["calib.corpus", "calib.n", "calib.seqlen"]
    if df.empty or not all(c in df.columns for c in cols):
        return ""
    sets = sorted({(c, int(n), int(q)) for c, n, q in df[cols].dropna().itertuples(index=False)})
    return "Calibration: " + "; ".join(f"{c} {n} x {q} tokens" for c, n, q in sets) + "." if sets else ""


def _versions(df: pd.DataFrame) -> str:
    cols = [c for c in df.columns if c.startswith("versions.")]
    return ", ".join(f"{c.removeprefix('versions.')} {sorted(map(str, df[c].dropna().unique()))[0]}"
                     for c in sorted(cols) if df[c].notna().any())


KV_NOTE = ("Bits per stored K / V element at the evaluation context: the element bits, each group's 16-bit scale "
           "(and zero point) shared over the group, and the full-precision tokens (window, sinks, an incomplete "
           "group) at 16 bits; bytes per token over every layer and KV head.")


def write_paper_report(spec: dict[str, Any], df: pd.DataFrame, out_dir: str | Path, scale: str = "smoke",
                       plots: list[Path] | None = None) -> Path:
    """Write report.md, report.html and claims.json; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = check_claims(spec, df)
    boards = leaderboards(df)
    reported = reported_table(spec)
    failed = failed_runs(df)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{spec.get('paper', '?')}: {spec.get('title', '')}".strip()

    md = [f"# Reproduction report — {title}", "",
          f"Scale `{scale}`, generated {stamp}. Versions: {_versions(df) or 'n/a'}.", ""]
    if spec.get("notes"):
        md += [str(spec["notes"]).strip(), ""]
    md += ["## Claims", "", claims_table(results, spec).to_markdown(index=False, tablefmt="github") if results else "(no claims)", ""]
    md += [LEGEND, ""]
    calib = calibration_line(df)
    md += ([calib, ""] if calib else []) + [SEED_NOTE, ""]
    if reported is not None:
        md += ["## Numbers reported in the paper", "", reported.to_markdown(index=False, tablefmt="github"), ""]
    md += ["## Our results", ""]
    md += [b.to_markdown() for b in boards] or ["(no finished runs)"]
    kv = kv_cache_table(df)
    if kv is not None:
        md += ["## KV cache", "", KV_NOTE, "", kv.to_markdown(index=False, tablefmt="github"), ""]
    for plot in plots or []:
        md += [f"![{plot.stem}]({plot.name})", ""]
    if not failed.empty:
        md += ["## Failed runs", "", failed.to_markdown(index=False, tablefmt="github"), ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    from harness.report.page import render_page

    page = render_page(title=title, scale=str(scale), stamp=stamp, versions=_versions(df), spec=spec, results=results,
                       boards=boards, reported=reported, failed=failed, plots=list(plots or []), df=df, kv=kv,
                       legend=LEGEND.replace("*", ""), calibration=calib, seed_note=SEED_NOTE.replace("`", ""),
                       notes_html=inline_html(spec["notes"]) if spec.get("notes") else "")
    (out / "report.html").write_text(page)
    (out / "claims.json").write_text(json.dumps([r.to_dict() for r in results], indent=1))
    return md_path
