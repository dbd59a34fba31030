"""`ptqbench reproduce PAPER`: run a paper's spec at a scale, then write its report.

The spec is `experiments/papers/<paper>.yaml`; the report goes to `results/papers/<paper>/`
(report.md, report.html, claims.json and plots), built only from the runs of that spec and scale.
"""
from __future__ import annotations

from pathlib import Path

from harness.errors import UnknownNameError

REPO_ROOT = Path(__file__).resolve().parents[1]


def papers_dir() -> Path:
    for candidate in (Path.cwd() / "experiments" / "papers", REPO_ROOT / "experiments" / "papers"):
        if candidate.is_dir():
            return candidate
    return REPO_ROOT / "experiments" / "papers"


def list_papers() -> list[str]:
    return sorted(p.stem for p in papers_dir().glob("*.yaml"))


def paper_spec_path(paper: str) -> Path:
    from harness.store import NAME_RE

    if not isinstance(paper, str) or not NAME_RE.fullmatch(paper) or ".." in paper:
        raise UnknownNameError("paper", paper, list_papers())
    path = papers_dir() / f"{paper}.yaml"
    if not path.is_file():
        raise UnknownNameError("paper", paper, list_papers())
    return path


def with_spec_labels(df, cells):
    """The results of these cells, each row under the method label *this* spec gives it.

    A run id hashes what changes the number, not the label, so a run recorded by another spec (QuaRot with
    its default params is `quarot` in one paper and `quarot_gptq` in another) is reused as it is, and
    one run can stand under two labels of the same spec: its rows are repeated, one per label."""
    labels: dict[str, set[str]] = {}
    for cell in cells:
        for rid in cell.run_ids.values():
            labels.setdefault(rid, set()).add(cell.method_label)
    if df.empty:
        return df
    df = df[df["run_id"].isin(labels)].copy()
    df["method_label"] = df["run_id"].map(lambda rid: sorted(labels[rid]))
    return df.explode("method_label", ignore_index=True)


def write_report(spec, cells, store, scale: str | None, out_dir: str | Path | None = None) -> Path:
    """Report of the runs of these cells (claims, leaderboards, plots) under results/papers/<paper>/."""
    from harness.report import plots
    from harness.report.leaderboard import by_protocol, select
    from harness.report.paper import write_paper_report
    from harness.store import load_results

    from harness.store import check_name, inside

    paper = check_name("paper id", spec.file.paper or spec.name)
    out = Path(out_dir) if out_dir else inside(store.root / "papers", store.root / "papers" / paper, "paper report")
    df = with_spec_labels(load_results(store.root), cells)
    images = []
    if not df.empty and (df["metric"] == "ppl").any():
        task = "wikitext2" if (df["task"] == "wikitext2").any() else None
        models = sorted(set(df["model"].dropna()))
        for model in models:  # one set of plots per model and evaluation protocol: never pooled
            protocols = by_protocol(select(df, task, model))
            for k, (_, rows) in enumerate(protocols):
                prefix = (f"{model}_" if len(models) > 1 else "") + (f"p{k}_" if len(protocols) > 1 else "")
                for make in (plots.format_bars, plots.fp_gap_heatmap, plots.metric_vs_kv_bits):
                    try:
                        images += [p for p in make(rows, "ppl", out, task=task, model=model, prefix=prefix)
                                   if p.suffix == ".png"]
                    except Exception:  # noqa: BLE001 - a plot never blocks the report
                        pass
    if not df.empty and (df["metric"] == "routing_agreement").any():  # MoE runs: expert shift by layer
        models = sorted(set(df[df["metric"] == "routing_agreement"]["model"].dropna()))
        for model in models:
            try:
                images += [p for p in plots.routing_by_layer(df, out, model=model,
                                                             prefix=f"{model}_" if len(models) > 1 else "")
                           if p.suffix == ".png"]
            except Exception:  # noqa: BLE001 - a plot never blocks the report
                pass
    return write_paper_report(spec.data, df, out, scale=scale or "default", plots=images)
