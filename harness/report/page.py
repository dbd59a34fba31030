"""The HTML page of a paper's reproduction report.

What a researcher reads first: one row per claim (what it says, where it comes from, the paper's numbers,
then per model our values with their 95% intervals, the compared ratio and a verdict badge in text and
colour), the leaderboards with intervals, the plots inline, the failed runs with their reasons, and the
protocol of every number in a collapsible block. Everything is escaped; missing values print as "–" (never
`nan`), dictionaries as "key: value" text; the fonts are system sans-serif and every mark is plain text, so
nothing depends on an emoji font.
"""
from __future__ import annotations

import html
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report.claims import ClaimResult

VERDICT_CLASS = {"reproduced": "ok", "contradicted": "bad", "inconclusive": "meh", "not run": "off"}
ORIGIN_TEXT = {"paper": "the paper's claim", "baseline": "baseline check", "hypothesis": "our hypothesis"}

STYLE = """
body{font-family:"DejaVu Sans","Liberation Sans",Arial,Helvetica,sans-serif;color:#1d2329;max-width:1180px;
  margin:2em auto;padding:0 1em;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #d8dee4;padding-bottom:.2em}
.meta{color:#57606a;font-size:.9em}.notes{background:#f6f8fa;border-left:4px solid #d0d7de;padding:.4em 1em;font-size:.92em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{padding:.35em .6em;border-bottom:1px solid #e4e8ec;
  vertical-align:top;text-align:left}th{background:#f6f8fa}
code{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.88em;background:#f1f3f5;padding:0 .2em}
.badge{display:inline-block;border-radius:3px;padding:.05em .45em;font-weight:bold;font-size:.85em;white-space:nowrap}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}.meh{background:#fff8c5;color:#7d4e00}
.off{background:#eaeef2;color:#57606a}.origin{color:#57606a;font-size:.82em}.says{font-weight:600}
.num{font-variant-numeric:tabular-nums}.small{font-size:.85em;color:#57606a}
.leaderboard td{font-variant-numeric:tabular-nums;white-space:nowrap}
img.plot{max-width:48%;margin:.3em;border:1px solid #e4e8ec}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}.protocol{font-size:.85em;color:#57606a}
"""


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def text_of(value: Any) -> str:
    """A spec value as reading text: dicts as "key: value, ...", lists joined, None / NaN as "–"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {text_of(v)}" if not isinstance(v, dict) else
                         f"{k}: " + ", ".join(f"{kk} {text_of(vv)}" for kk, vv in v.items()) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(text_of(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def badge(verdict: str) -> str:
    return f"<span class='badge {VERDICT_CLASS.get(verdict, 'off')}'>{esc(verdict)}</span>"


def value_lines(result: ClaimResult) -> list[str]:
    """Our numbers of one claim on one model, as text lines: each term with its 95% interval (or seed spread),
    then the compared quantity (a ratio, or approx's gap) with its interval."""
    if result.verdict == "not run":
        return [result.detail]
    lines = []
    for term, est in result.values.items():
        ci = est.interval
        text = f"{term} = {est.mean:.4g}"
        if ci is not None and ci.low != ci.high:
            text += f" [{ci.low:.4g}, {ci.high:.4g}]"
        elif est.n > 1:
            text += f" ± {est.std:.3g}"
        lines.append(text + (f" (n={est.n})" if est.n > 1 else "") + (" (diverged)" if est.diverged else ""))
    for c in result.comparisons:
        if "ratio_ci95" in c:
            low, high = c["ratio_ci95"]
            if low == high:  # no per-window data and no spread: nothing to resample
                lines.append(f"ratio {c['ratio']:.4g} (point values, no interval)")
            else:
                lines.append(f"ratio {c['ratio']:.4g} (95%: {low:.4g} to {high:.4g}{'' if c['paired'] else ', unpaired'})")
        elif c.get("op") == "approx":
            low, high = c["gap_ci95"]
            lines.append(f"gap {c['gap']:+.2%} (95%: {low:+.2%} to {high:+.2%}; allowed ±{c['rel']:.0%})")
    return lines or [result.detail]


def claims_html(spec: dict[str, Any], results: list[ClaimResult]) -> str:
    """One row per claim, one column per model (value, interval, verdict)."""
    if not results:
        return "<p>(no claims)</p>"
    models = list(OrderedDict.fromkeys(r.model or "–" for r in results))
    by_claim: dict[str, dict[str, ClaimResult]] = OrderedDict()
    for r in results:
        by_claim.setdefault(r.id, {})[r.model or "–"] = r
    meta = {c.get("id", ""): c for c in spec.get("claims") or []}
    head = "<tr><th>Claim</th><th>Paper</th>" + "".join(f"<th>{esc(m)}</th>" for m in models) + "</tr>"
    rows = []
    for cid, per_model in by_claim.items():
        first = next(iter(per_model.values()))
        claim = meta.get(cid, {})
        origin = ORIGIN_TEXT.get(claim.get("origin", ""), "")
        left = (f"<div class='says'>{esc(first.says or cid)}</div><div class='origin'>{esc(cid)}"
                f"{' · ' + esc(origin) if origin else ''}</div><code>{esc(first.check)}</code>")
        if claim.get("note"):
            left += f"<div class='small'>{esc(claim['note'])}</div>"
        cells = []
        for m in models:
            r = per_model.get(m)
            cells.append("<td>–</td>" if r is None else
                         f"<td>{badge(r.verdict)}<br><span class='num'>{'<br>'.join(esc(v) for v in value_lines(r))}</span></td>")
        rows.append(f"<tr><td>{left}</td><td class='small'>{esc(text_of(first.paper))}</td>{''.join(cells)}</tr>")
    return f"<table class='claims'>{head}{''.join(rows)}</table>"


def table_html(frame: pd.DataFrame) -> str:
    """A plain table with every value as text ("–" for missing)."""
    if frame is None or frame.empty:
        return ""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(text_of(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def protocols_html(df: pd.DataFrame) -> str:
    """Every number with the protocol that produced it, collapsed by default."""
    from harness.report.leaderboard import method_column, protocol_line

    if df.empty:
        return ""
    mcol = method_column(df)
    main = df[df["metric"].isin(["ppl", "acc", "kl", "greedy_agreement", "routing_agreement"]) | df["metric"].isna()]
    rows = []
    for _, r in main.sort_values([c for c in ("model", mcol, "scheme", "task", "seed") if c in main]).iterrows():
        value = "failed" if r.get("status") != "done" else text_of(r.get("value"))
        proto = protocol_line(pd.DataFrame([r]))
        rows.append("<tr>" + "".join(f"<td>{esc(text_of(r.get(c)))}</td>" for c in ("model", mcol, "scheme", "task", "seed"))
                    + f"<td class='num'>{esc(value)}</td><td class='small'>{esc(proto)}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "method", "scheme", "task", "seed", "value", "protocol"))
    return (f"<details><summary>Protocol of every number ({len(rows)} runs)</summary>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></details>")


def render_page(*, title: str, scale: str, stamp: str, versions: str, spec: dict[str, Any], results: list[ClaimResult],
                boards: list, reported: pd.DataFrame | None, failed: pd.DataFrame, plots: list[Path], df: pd.DataFrame,
                legend: str, calibration: str, seed_note: str, notes_html: str, kv: pd.DataFrame | None = None) -> str:
    body = [f"<h1>Reproduction report — {esc(title)}</h1>",
            f"<p class='meta'>Scale <code>{esc(scale)}</code> · generated {esc(stamp)} · {esc(versions or 'versions n/a')}</p>"]
    if notes_html:
        body.append(f"<div class='notes'>{notes_html}</div>")
    body += ["<h2>Claims</h2>", claims_html(spec, results), f"<p class='small'>{esc(legend)}</p>"]
    if calibration:
        body.append(f"<p class='small'>{esc(calibration)}</p>")
    body.append(f"<p class='small'>{esc(seed_note)}</p>")
    if reported is not None and not reported.empty:
        body += ["<h2>Numbers reported in the paper</h2>", table_html(reported)]
    body.append("<h2>Our results</h2>")
    body += [b.to_html() for b in boards] or ["<p>(no finished runs)</p>"]
    if kv is not None and not kv.empty:
        body += ["<h2>KV cache</h2>", table_html(kv)]
    body += [f"<img class='plot' src='{esc(p.name)}' alt='{esc(p.stem)}'>" for p in plots]
    if failed is not None and not failed.empty:
        body += ["<h2>Failed runs</h2>", table_html(failed)]
    body += ["<h2>Protocols</h2>", protocols_html(df)]
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
