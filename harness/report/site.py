"""Static HTML dashboard (`results/site/index.html`): leaderboards, plots and a filterable run table.

Self-contained: one HTML file with inline CSS/JS plus a `plots/` folder; open it from disk, no server.
"""
from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

import pandas as pd

from harness.report import plots as plot_lib
from harness.report.leaderboard import HEADLINE_METRICS, build_leaderboard, by_protocol, method_column, select


STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;display:block;overflow-x:auto;max-width:100%}td,th{padding:3px 9px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.protocol{color:#666;font-size:.85em}
.plots img{max-width:48%;margin:4px;border:1px solid #eee}#filter{width:30em;padding:4px}
tr.failed td{color:#a00}nav a{margin-right:1em}
"""

SCRIPT = """
function applyFilter(){
  const words = document.getElementById('filter').value.toLowerCase().split(/\\s+/).filter(w => w);
  const status = document.getElementById('status').value;
  let shown = 0;
  for (const row of document.querySelectorAll('#runs tbody tr')) {
    const text = row.textContent.toLowerCase();
    const ok = words.every(w => text.includes(w)) && (!status || row.dataset.status === status);
    row.style.display = ok ? '' : 'none';
    if (ok) shown += 1;
  }
  document.getElementById('shown').textContent = shown;
}
document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('filter').addEventListener('input', applyFilter);
  document.getElementById('status').addEventListener('change', applyFilter);
  applyFilter();
});
"""


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: config columns plus one column per metric."""
    if df.empty:
        return df
    mcol = method_column(df)
    keys = [c for c in ("run_id", "model", mcol, "scheme", "task", "seed", "status", "error", "wandb") if c in df.columns]
    base = df[keys].drop_duplicates("run_id").set_index("run_id")
    metrics = df.dropna(subset=["metric"]).pivot_table(index="run_id", columns="metric", values="value", aggfunc="first")
    return base.join(metrics).reset_index()


def _runs_html(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p>No runs yet.</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for _, r in table.iterrows():
        cells = []
        for c in table.columns:
            v = r[c]
            text = "" if pd.isna(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        status = html.escape(str(r.get("status", "")))
        rows.append(f"<tr data-status='{status}' class='{status}'>{''.join(cells)}</tr>")
    return f"<table id='runs'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def styled_page(title: str, body: str) -> str:
    """A standalone HTML page with the dashboard's style (the leaderboard tables use it too)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def build_site(df: pd.DataFrame, out_dir: str | Path = "results/site", title: str = "ptqbench leaderboard") -> Path:
    """Write index.html (+ plots/) and return its path."""
    out = Path(out_dir)
    plot_dir = out / "plots"
    out.mkdir(parents=True, exist_ok=True)
    sections, images = [], []
    done = df[df["status"] == "done"] if not df.empty else df
    groups = sorted({(m, t, k) for m, t, k in done[["model", "task", "metric"]].itertuples(index=False)
                     if k in HEADLINE_METRICS}) if not done.empty else []
    for model, task, metric in groups:
        protocols = by_protocol(select(df, task, model))
        for k, (_, rows) in enumerate(protocols):  # one table and one set of plots per evaluation protocol
            board = build_leaderboard(rows, metric, task=task, model=model)
            sections.append(board.to_html())
            tag = f"{model}_{task}".replace("/", "_") + (f"_p{k}" if len(protocols) > 1 else "")
            try:
                images += plot_lib.format_bars(rows, metric, plot_dir / tag, task=task, model=model)
                if board.baseline is not None:
                    images += plot_lib.fp_gap_heatmap(rows, metric, plot_dir / tag, task=task, model=model)
                if (rows["metric"] == "calib_seconds").any():  # quality vs what calibration cost
                    images += plot_lib.cost_scatter(rows, metric, plot_dir / tag, task=task, model=model)
            except Exception as exc:  # a plot must never take the dashboard down
                sections.append(f"<p class='protocol'>plot failed: {html.escape(str(exc))}</p>")
    pngs = [p for p in images if p.suffix == ".png"]
    table = run_table(df)
    counts = table["status"].value_counts().to_dict() if not table.empty else {}
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(table)} runs ({html.escape(json.dumps(counts))}), generated {stamp}.</p>",
        "<nav><a href='#leaderboards'>Leaderboards</a><a href='#plots'>Plots</a><a href='#runs-section'>Runs</a></nav>",
        "<h2 id='leaderboards'>Leaderboards</h2>", *(sections or ["<p>No finished runs.</p>"]),
        "<h2 id='plots'>Plots</h2><div class='plots'>",
        *[f"<img src='{html.escape(str(p.relative_to(out)))}' alt='{html.escape(p.stem)}'>" for p in pngs],
        "</div>",
        "<h2 id='runs-section'>Runs</h2>",
        "<p><input id='filter' placeholder='filter: e.g. gptq mxfp4'> <select id='status'><option value=''>all</option>"
        "<option>done</option><option>failed</option></select> showing <span id='shown'></span></p>",
        _runs_html(table),
    ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body>{''.join(body)}</body></html>\n")
    index = out / "index.html"
    index.write_text(page)
    return index
