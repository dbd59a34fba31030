"""Leaderboards: methods x schemes pivots of one metric, with the FP baseline and deltas.

Cells are means over seeds with their spread ("12.34 ± 0.05" when more than one seed ran), the best
entry of every column is marked, and failed runs show as "failed" rather than disappearing.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass

import pandas as pd

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
                    out.loc[r, c] = esc("failed" if self.failed.loc[r, c] else "–")
                    continue
                text = f"{m:.{digits}f}"
                if self.n.loc[r, c] > 1 and not pd.isna(self.std.loc[r, c]):
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


def build_leaderboard(df: pd.DataFrame, metric: str, task: str | None = None, model: str | None = None,
                      baseline: tuple[str, str] | None = ("fp", "w16a16"), columns: str = "scheme") -> Leaderboard:
    """Pivot `metric` (for one task and model) into methods x `columns`, means over seeds."""
    mcol = method_column(df)
    rows = df
    if task is not None:
        rows = rows[rows["task"] == task]
    if model is not None:
        rows = rows[rows["model"] == model]
    failed_runs = rows[rows["status"] != "done"]
    done = rows[(rows["status"] == "done") & (rows["metric"] == metric)]
    grouped = done.groupby([mcol, columns])["value"]
    mean, std, n = (grouped.agg(f).unstack() for f in ("mean", "std", "count"))
    index = sorted(set(rows[mcol].dropna()))
    cols = sorted(set(rows[columns].dropna()))
    mean, std, n = (f.reindex(index=index, columns=cols) for f in (mean, std, n))
    failed = pd.DataFrame(False, index=index, columns=cols)
    for _, r in failed_runs.iterrows():
        if r[mcol] in failed.index and r[columns] in failed.columns:
            failed.loc[r[mcol], r[columns]] = True
    base = None
    if baseline is not None and baseline[0] in mean.index and baseline[1] in mean.columns:
        base = mean.loc[baseline[0], baseline[1]]
        base = None if pd.isna(base) else float(base)
    title = f"{metric} — {model or 'all models'} — {task or 'all tasks'}"
    return Leaderboard(title, metric, mean, std, n.fillna(0).astype(int), failed, base, protocol_line(rows))


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
