"""Leaderboards: methods x schemes pivots of one metric, with the FP baseline and deltas.

Cells are means over seeds; perplexity cells carry their 95% bootstrap interval over evaluation windows
and seeds ("12.34 [11.90, 12.81]"), accuracy cells theirs over the documents scored, other metrics their
seed spread ("0.123 ± 0.004" when more than one
seed ran). The best entry of every column is marked, and failed runs show as "failed" rather than
disappearing. A cell's interval is wide because windows differ in difficulty; two cells measured on the
same windows are compared with the claims' paired intervals (harness.report.claims), much narrower.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import pandas as pd

from harness.errors import PtqbenchError

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: object) -> str:
    """Text safe inside a LaTeX table cell or caption (every special character escaped)."""
    return re.sub(r"[\\&%$#_{}~^<>]", lambda m: _LATEX_SPECIAL[m.group(0)], str(text))


def html_escape(text: object) -> str:
    return html.escape(str(text), quote=True)


LOWER_IS_BETTER = {"ppl", "kl", "nll", "calib_seconds", "calib_peak_mb"}


def method_column(df: pd.DataFrame) -> str:
    return "method_label" if "method_label" in df.columns else "method"


@dataclass
class Leaderboard:
    """One table: `mean`/`std`/`n` frames (rows = methods, columns = schemes) plus its protocol."""

    title: str
    metric: str
    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    failed: pd.DataFrame
    baseline: float | None = None
    protocol: str = ""
    diverged: dict | None = None  # (row, column) -> the measured value of a failed-as-diverged run
    intervals: dict | None = None  # (row, column) -> Interval (95%, windows and seeds) of a perplexity cell

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER or self.metric.endswith("ppl")

    def best(self) -> pd.DataFrame:
        """True where the entry is the best of its column."""
        target = self.mean.min() if self.lower_is_better else self.mean.max()
        return self.mean.eq(target, axis=1) & self.mean.notna()

    def cells(self, digits: int = 3, bold=("**", "**"), escape=None) -> pd.DataFrame:
        """The table as text. `escape` (e.g. html_escape) is applied to every label and value, before the
        best-entry markup is added, so only that markup stays live."""
        best = self.best()
        out = pd.DataFrame(index=self.mean.index, columns=self.mean.columns, dtype=object)
        out = self._fill(out, best, digits, bold, escape or (lambda t: t))
        if escape is not None:
            out.index = pd.Index([escape(v) for v in out.index], name=escape(out.index.name) if out.index.name else None)
            out.columns = pd.Index([escape(v) for v in out.columns],
                                   name=escape(out.columns.name) if out.columns.name else None)
        return out

    def _fill(self, out, best, digits, bold, esc) -> pd.DataFrame:
        for r in self.mean.index:
            for c in self.mean.columns:
                m = self.mean.loc[r, c]
                if pd.isna(m):
                    value = (self.diverged or {}).get((r, c))
                    text = f"diverged ({value:.4g})" if value is not None else "failed" if self.failed.loc[r, c] else "–"
                    out.loc[r, c] = esc(text)
                    continue
                text = f"{m:.{digits}f}"
                interval = (self.intervals or {}).get((r, c))
                if interval is not None:
                    text += f" [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"
                elif self.n.loc[r, c] > 1 and not pd.isna(self.std.loc[r, c]):
                    text += f" ± {self.std.loc[r, c]:.{digits}f}"
                if self.baseline is not None and not math.isclose(m, self.baseline):
                    text += f" ({m - self.baseline:+.{digits}f})"
                text = esc(text)
                out.loc[r, c] = f"{bold[0]}{text}{bold[1]}" if best.loc[r, c] else text
        return out

    def to_markdown(self) -> str:
        head = f"### {self.title}\n\n"
        if self.baseline is not None:
            head += f"FP baseline: {self.baseline:.3f}; deltas in parentheses; best per column in bold.\n\n"
        if self.intervals:
            head += "Brackets: 95% bootstrap interval over the evaluation windows or documents (and seeds).\n\n"
        body = self.cells().to_markdown(tablefmt="github")
        return head + body + (f"\n\n_{self.protocol}_\n" if self.protocol else "\n")

    def to_html(self) -> str:
        # every label and value escaped here; only the <b> of the best entries is markup
        table = self.cells(bold=("<b>", "</b>"), escape=html_escape).to_html(escape=False, classes="leaderboard",
                                                                             border=0)
        proto = f"<p class='protocol'>{html_escape(self.protocol)}</p>" if self.protocol else ""
        return f"<h3>{html_escape(self.title)}</h3>\n{table}\n{proto}"

    def to_latex(self) -> str:
        esc = lambda t: latex_escape(t).replace("±", "$\\pm$")  # noqa: E731
        cells = self.cells(bold=("\\textbf{", "}"), escape=esc)
        return cells.to_latex(escape=False, caption=latex_escape(self.title),
                              column_format="l" + "r" * len(cells.columns))


class MixedProtocolError(PtqbenchError):
    """A table, plot or FP gap asked to combine runs evaluated under different protocols."""


def _protocol_fields() -> list[str]:
    from harness.spec.schema import KIND_SETTINGS, NOT_HASHED

    fields = {f for kind, cls in KIND_SETTINGS.items() for f in cls.model_fields if f not in NOT_HASHED.get(kind, ())}
    return sorted(fields | {"threads"})


def protocol_of(rows: pd.DataFrame) -> pd.Series:
    """Per row, the evaluation protocol that moves its number ("seqlen=256, max_windows=4, threads=2")."""
    from harness.spec.schema import DEFAULT_THREADS

    cols = [c for c in (f"protocol.{f}" for f in _protocol_fields()) if c in rows.columns]

    def label(row) -> str:
        parts = []
        for c in cols:
            v = row[c]
            if pd.isna(v) and c == "protocol.threads":
                v = DEFAULT_THREADS  # records from before `threads` ran with the default
            if not pd.isna(v):
                v = int(v) if isinstance(v, float) and v.is_integer() else v
                parts.append(f"{c.removeprefix('protocol.')}={v}")
        return ", ".join(parts)

    return rows.apply(label, axis=1) if len(rows) else pd.Series([], dtype=object)


def by_protocol(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """`rows` split by evaluation protocol (one task's runs: seqlen/windows, lm-eval limit/shots, ...)."""
    if rows.empty:
        return []
    labels = protocol_of(rows)
    return [(label, rows[labels == label]) for label in sorted(set(labels))]


def one_protocol(rows: pd.DataFrame, what: str) -> str:
    """The single protocol of `rows`, or a MixedProtocolError naming them all (they are never pooled)."""
    groups = by_protocol(rows)
    if len(groups) > 1:
        raise MixedProtocolError(f"{what}: the runs use {len(groups)} evaluation protocols "
                                 f"({' | '.join(g for g, _ in groups)}); numbers of different protocols are "
                                 f"never combined: make one table per protocol (harness.report.leaderboard.by_protocol)")
    return groups[0][0] if groups else ""


def select(df: pd.DataFrame, task: str | None = None, model: str | None = None) -> pd.DataFrame:
    rows = df
    if task is not None:
        rows = rows[rows["task"] == task]
    if model is not None:
        rows = rows[rows["model"] == model]
    return rows


def build_leaderboards(df: pd.DataFrame, metric: str, task: str, model: str, **kwargs) -> list[Leaderboard]:
    """One leaderboard per evaluation protocol of (task, model): numbers of different protocols never share a
    cell, and each FP gap is taken to the FP run of the same protocol."""
    return [build_leaderboard(rows, metric, task=task, model=model, **kwargs)
            for _, rows in by_protocol(select(df, task, model))]


HEADLINE_METRICS = ("ppl", "acc", "kl", "greedy_agreement", "routing_agreement")


def headline_leaderboards(df: pd.DataFrame, metrics=HEADLINE_METRICS) -> list[Leaderboard]:
    """Every (model, task, headline metric) table of the recorded runs, one per evaluation protocol."""
    if df.empty:
        return []
    done = df[df["status"] == "done"]
    return [board for (model, task, metric), _ in done.groupby(["model", "task", "metric"]) if metric in metrics
            for board in build_leaderboards(df, metric, task, model)]


def build_leaderboard(df: pd.DataFrame, metric: str, task: str | None = None, model: str | None = None,
                      baseline: tuple[str, str] | None = ("fp", "w16a16"), columns: str = "scheme") -> Leaderboard:
    """Pivot `metric` (for one task and model, one protocol) into methods x `columns`, means over seeds.

    Runs of different evaluation protocols are refused (MixedProtocolError): use `build_leaderboards`.
    """
    mcol = method_column(df)
    rows = select(df, task, model)
    protocol = one_protocol(rows, f"{metric} on {task or 'all tasks'} / {model or 'all models'}")
    failed_runs = rows[rows["status"] != "done"]
    done = rows[(rows["status"] == "done") & (rows["metric"] == metric)]
    grouped = done.groupby([mcol, columns])["value"]
    mean, std, n = (grouped.agg(f).unstack() for f in ("mean", "std", "count"))
    index = sorted(set(rows[mcol].dropna()))
    cols = sorted(set(rows[columns].dropna()))
    mean, std, n = (f.reindex(index=index, columns=cols) for f in (mean, std, n))
    failed = pd.DataFrame(False, index=index, columns=cols)
    diverged = {}
    for _, r in failed_runs.iterrows():
        if r[mcol] in failed.index and r[columns] in failed.columns:
            failed.loc[r[mcol], r[columns]] = True
            if r.get("metric") == metric and pd.notna(r.get("value")):  # measured, above the divergence limit
                diverged[(r[mcol], r[columns])] = float(r["value"])
    base = None
    if baseline is not None and baseline[0] in mean.index and baseline[1] in mean.columns:
        base = mean.loc[baseline[0], baseline[1]]
        base = None if pd.isna(base) else float(base)
    title = f"{metric} — {model or 'all models'} — {task or 'all tasks'}" + (f" — {protocol}" if protocol else "")
    intervals = cell_intervals(done, mcol, columns, metric) or None
    return Leaderboard(title, metric, mean, std, n.fillna(0).astype(int), failed, base, protocol_line(rows), diverged,
                       intervals)


def cell_intervals(done: pd.DataFrame, mcol: str, columns: str, metric: str) -> dict:
    """(method, column) -> 95% interval of the cell's `metric`: a perplexity from its runs' per-window NLLs,
    an accuracy from their per-document scores (cells without them get none)."""
    from harness.report.intervals import Interval, Resampler, runs_example_draws, runs_ppl_draws

    resampler, out = Resampler(), {}
    for (r, c), cell in done.groupby([mcol, columns]):
        label = f"{r}|{c}"
        found = (runs_ppl_draws(cell, resampler, label) if metric == "ppl"
                 else runs_example_draws(cell, resampler, label, metric))
        if found is not None:
            out[(r, c)] = Interval.of(found[0])
    return out


def protocol_line(df: pd.DataFrame) -> str:
    """One line with the protocol fields the runs of a table share (and which ones vary)."""
    parts = []
    for col in sorted(c for c in df.columns if c.startswith("protocol.")):
        # escaped so a value such as the "\n\n" join rule keeps the line one line
        values = sorted({str(v).encode("unicode_escape").decode("ascii") for v in df[col].dropna()})
        if not values:
            continue
        parts.append(f"{col.removeprefix('protocol.')}={values[0] if len(values) == 1 else '{' + ','.join(values) + '}'}")
    return "; ".join(parts)
