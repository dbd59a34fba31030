"""Plots from the tidy results table (matplotlib, PNG + SVG).

- metric vs bits per method (bits = weight bits per element of the scheme, scale overhead included)
- metric vs KV-cache bits per element (as each run recorded it)
- per-format bars (one metric, methods side by side for every scheme)
- accuracy vs calibration cost scatter
- FP-gap heatmap (method x scheme, metric minus the FP baseline)
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from harness.report.leaderboard import build_leaderboard, method_column, one_protocol, select


def _plt():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    import re

    out_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "plot"  # a file name, never a path
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=120)
    _plt().close(fig)
    return paths


def scheme_bits(scheme: str) -> float | None:
    """Weight bits per element of a scheme preset (None when unknown or full precision)."""
    try:
        from harness.quant import get_scheme

        s = get_scheme(scheme)
    except Exception:
        return None
    fmt = getattr(s, "w", None) or getattr(s, "weight", None)
    return float(fmt.bits_per_element) if fmt is not None else 16.0


def _done(df: pd.DataFrame, metric: str, task: str | None, model: str | None) -> pd.DataFrame:
    """Done runs of `metric`; a MixedProtocolError if they were evaluated under different protocols."""
    rows = select(df, task, model)
    rows = rows[(rows["status"] == "done") & (rows["metric"] == metric)]
    one_protocol(rows, f"plot of {metric} on {task or 'all tasks'} / {model or 'all models'}")
    return rows


def metric_vs_bits(df: pd.DataFrame, metric: str, out_dir: Path, task: str | None = None, model: str | None = None,
                   bits_of: Callable[[str], float | None] = scheme_bits) -> list[Path]:
    rows = _done(df, metric, task, model)
    mcol = method_column(df)
    means = rows.groupby([mcol, "scheme"])["value"].mean().reset_index()
    means["bits"] = means["scheme"].map(bits_of)
    means = means.dropna(subset=["bits"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in means.groupby(mcol):
        group = group.sort_values("bits")
        ax.plot(group["bits"], group["value"], marker="o", label=method)
    ax.set_xlabel("weight bits per element (scale overhead included)")
    ax.set_ylabel(metric)
    if metric == "ppl":
        ax.set_yscale("log")
    ax.set_title(f"{metric} vs bits — {model or ''} {task or ''}".strip())
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"{metric}_vs_bits")


def format_bars(df: pd.DataFrame, metric: str, out_dir: Path, task: str | None = None, model: str | None = None,
                prefix: str = "") -> list[Path]:
    board = build_leaderboard(df, metric, task=task, model=model, baseline=None)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, len(board.mean.columns) * 1.2), 4))
    board.mean.T.plot.bar(ax=ax, yerr=board.std.T.fillna(0), logy=metric == "ppl", rot=30)
    if board.diverged:  # measured but above the divergence limit: no bar, but never left out silently
        text = "diverged: " + "; ".join(f"{r} / {c} = {v:.3g}" for (r, c), v in sorted(board.diverged.items()))
        ax.text(0.01, 0.98, text, transform=ax.transAxes, va="top", fontsize=7, color="#a00")
    ax.set_ylabel(metric)
    ax.set_xlabel("scheme")
    ax.set_title(board.title)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"{prefix}{metric}_by_format")


def metric_vs_kv_bits(df: pd.DataFrame, metric: str, out_dir: Path, task: str | None = None, model: str | None = None,
                      prefix: str = "") -> list[Path]:
    """metric vs the bits per stored KV element each run recorded (`kv_cache.bits_per_element`, scales and
    full-precision tokens included): one point per (method, scheme), so a window's cost shows. No KV
    quantization among the runs: no plot."""
    rows = _done(df, metric, task, model)
    if "kv_cache.bits_per_element" not in rows.columns or not (rows["kv_cache.bits_per_element"] < 16).any():
        return []
    mcol = method_column(rows)
    points = rows.groupby([mcol, "scheme"]).agg(value=("value", "mean"), bits=("kv_cache.bits_per_element", "first"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in points.reset_index().groupby(mcol):
        ax.scatter(group["bits"], group["value"], label=method)
        for _, point in group.iterrows():
            ax.annotate(str(point["scheme"]), (point["bits"], point["value"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("KV cache bits per element (scales and full-precision tokens included)")
    ax.set_ylabel(metric)
    ax.set_yscale("log" if metric == "ppl" else "linear")
    ax.set_title(f"{metric} vs KV bits — {model or ''} {task or ''}".strip())
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"{prefix}{metric}_vs_kv_bits")


def routing_by_layer(df: pd.DataFrame, out_dir: Path, model: str | None = None, prefix: str = "") -> list[Path]:
    """MoE expert-selection agreement with the FP model per MoE layer (the `routing` task's
    `routing_agreement.layer<i>`), one line per (method, scheme): where along the depth expert shift starts."""
    rows = select(df, "routing", model)
    rows = rows[(rows["status"] == "done") & rows["metric"].astype(str).str.startswith("routing_agreement.layer")]
    if rows.empty:
        return []
    rows = rows.assign(layer=rows["metric"].str.rsplit("layer", n=1).str[-1].astype(int))
    mcol = method_column(rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, scheme), group in rows.groupby([mcol, "scheme"]):
        line = group.groupby("layer")["value"].mean().sort_index()
        ax.plot(line.index, line.values, marker=".", label=f"{method} / {scheme}")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("top-k expert set = FP model's (fraction of tokens)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"expert-selection agreement by layer — {model or ''}".strip(" —"))
    ax.legend(fontsize=7)
    return _save(fig, out_dir, f"{prefix}routing_by_layer")


def cost_scatter(df: pd.DataFrame, metric: str, out_dir: Path, cost_metric: str = "calib_seconds",
                 task: str | None = None, model: str | None = None) -> list[Path]:
    mcol = method_column(df)
    quality = _done(df, metric, task, model).groupby([mcol, "scheme"])["value"].mean()
    runs = select(df, task, model)  # the cost of the runs plotted (same model and task), not of every model
    cost = runs[(runs["status"] == "done") & (runs["metric"] == cost_metric)].groupby([mcol, "scheme"])["value"].mean()
    joined = pd.concat({"quality": quality, "cost": cost}, axis=1).dropna().reset_index()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in joined.groupby(mcol):
        ax.scatter(group["cost"], group["quality"], label=method)
        for _, point in group.iterrows():  # the scheme of every point, written next to it
            ax.annotate(str(point["scheme"]), (point["cost"], point["quality"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(cost_metric)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs calibration cost")
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"{metric}_vs_{cost_metric}")


def fp_gap_heatmap(df: pd.DataFrame, metric: str, out_dir: Path, task: str | None = None, model: str | None = None,
                   baseline: tuple[str, str] = ("fp", "w16a16"), prefix: str = "") -> list[Path]:
    board = build_leaderboard(df, metric, task=task, model=model, baseline=baseline)
    gap = board.mean - (board.baseline if board.baseline is not None else 0.0)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, gap.shape[1] * 1.1), max(3, gap.shape[0] * 0.5)))
    image = ax.imshow(gap.to_numpy(dtype=float), cmap="viridis_r" if board.lower_is_better else "viridis", aspect="auto")
    ax.set_xticks(range(gap.shape[1]), gap.columns, rotation=30, ha="right")
    ax.set_yticks(range(gap.shape[0]), gap.index)
    for i in range(gap.shape[0]):
        for j in range(gap.shape[1]):
            v = gap.iat[i, j]
            if pd.notna(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label=f"{metric} − FP")
    ax.set_title(f"gap to FP — {board.title}")
    return _save(fig, out_dir, f"{prefix}{metric}_fp_gap")
