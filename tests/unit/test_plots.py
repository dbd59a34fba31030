from __future__ import annotations

import pandas as pd
from test_leaderboard import frame

from harness.report import plots


def test_all_plots_write_png_and_svg(tmp_path):
    df = frame()
    cost = df[df["status"] == "done"].assign(metric="calib_seconds", value=lambda d: d["value"] / 10)
    df = pd.concat([df, cost], ignore_index=True)
    bits = {"w16a16": 16.0, "mxfp4": 4.25, "int4": 4.0}
    paths = []
    paths += plots.metric_vs_bits(df, "ppl", tmp_path, bits_of=bits.get)
    paths += plots.format_bars(df, "ppl", tmp_path)
    paths += plots.cost_scatter(df, "ppl", tmp_path)
    paths += plots.fp_gap_heatmap(df, "ppl", tmp_path)
    assert len(paths) == 8
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
