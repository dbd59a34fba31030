"""Writes notebooks/analysis.ipynb (kept as code here so the notebook stays reviewable in diffs).

Run: python notebooks/make_analysis_notebook.py
"""
from pathlib import Path

import nbformat as nbf

CELLS = [
    ("md", "# ptqbench results analysis\n\nLoads the results table, rebuilds a leaderboard and a plot. "
           "Set `PTQBENCH_RESULTS_DIR` to analyse another results directory (default: the committed smoke "
           "results in `results/examples/smoke`, else `results`)."),
    ("code", """import os
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

from harness.report.leaderboard import build_leaderboard
from harness.report import plots
from harness.store import load_results

root = Path(os.environ.get("PTQBENCH_RESULTS_DIR") or next(
    (p for p in (Path("../results/examples/smoke"), Path("results/examples/smoke"), Path("results")) if (p / "runs").is_dir()),
    Path("results")))
df = load_results(root)
print(f"{df['run_id'].nunique()} runs from {root}")
df[["model", "method", "scheme", "task", "status", "metric", "value"]].head(10)"""),
    ("md", "## Leaderboard: perplexity per method and scheme (means over seeds, FP deltas)"),
    ("code", """ppl_tasks = sorted(df.loc[df["metric"] == "ppl", "task"].dropna().unique())
for model in sorted(df["model"].unique()):
    for task in ppl_tasks:
        board = build_leaderboard(df, "ppl", task=task, model=model)
        display(Markdown(board.to_markdown()))
assert ppl_tasks, "no perplexity results to analyse\""""),
    ("md", "## Plot: perplexity by number format"),
    ("code", """out = Path(os.environ.get("PTQBENCH_NOTEBOOK_OUT", "notebook_plots"))
paths = plots.format_bars(df, "ppl", out, task=ppl_tasks[0])
display(Image(filename=str(paths[0])))"""),
    ("md", "## Failed runs"),
    ("code", """df[df["status"] != "done"][["method", "scheme", "task", "error"]].drop_duplicates()"""),
]


def main() -> None:
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = Path(__file__).with_name("analysis.ipynb")
    nbf.write(nb, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
