from __future__ import annotations

import pandas as pd

from harness.report.leaderboard import build_leaderboard


def frame():
    rows = []
    for method, scheme, seed, value in [
        ("fp", "w16a16", 0, 20.0),
        ("rtn", "mxfp4", 0, 40.0),
        ("gptq", "mxfp4", 0, 30.0),
        ("gptq", "mxfp4", 1, 32.0),
        ("rtn", "int4", 0, 90.0),
    ]:
        rows.append({"model": "m", "task": "wikitext2", "method": method, "scheme": scheme, "seed": seed,
                     "status": "done", "metric": "ppl", "value": value, "protocol.seqlen": 512, "error": None})
    rows.append({"model": "m", "task": "wikitext2", "method": "gptq", "scheme": "int4", "seed": 0,
                 "status": "failed", "metric": None, "value": float("nan"), "protocol.seqlen": 512, "error": "x"})
    return pd.DataFrame(rows)


def test_pivot_means_deltas_best_and_failed():
    board = build_leaderboard(frame(), "ppl", task="wikitext2", model="m")
    assert board.mean.loc["gptq", "mxfp4"] == 31.0 and board.n.loc["gptq", "mxfp4"] == 2
    assert board.baseline == 20.0
    cells = board.cells()
    assert cells.loc["gptq", "mxfp4"].startswith("**31.000 ± 1.414 (+11.000)")  # best of its column, lower is better
    assert cells.loc["gptq", "int4"] == "failed"
    assert cells.loc["fp", "mxfp4"] == "–"
    md = board.to_markdown()
    assert "seqlen=512" in md and "| gptq" in md
    assert "<b>" in board.to_html() and "\\textbf" in board.to_latex() and "\\toprule" in board.to_latex()


def test_higher_is_better_for_accuracy():
    df = frame().assign(metric="acc", value=lambda d: 1 / d["value"])
    board = build_leaderboard(df, "acc", baseline=None)
    assert board.best().loc["gptq", "mxfp4"] and not board.best().loc["rtn", "mxfp4"]


def test_protocol_line_stays_one_line():
    import pandas as pd

    from harness.report.leaderboard import protocol_line

    df = pd.DataFrame({"protocol.text.join": ["\n\n", "\n\n"], "protocol.seqlen": [256, 256]})
    line = protocol_line(df)
    assert "\n" not in line and "text.join=\\n\\n" in line and "seqlen=256" in line


def test_perplexity_cells_carry_their_window_bootstrap_interval():
    import json

    import numpy as np

    df = frame()
    rng = np.random.default_rng(0)
    nll = {i: rng.uniform(2, 4, 8) * 511 for i in range(len(df))}
    df["info.window_nll"] = [json.dumps(nll[i].tolist()) for i in range(len(df))]
    df["protocol.tokens_predicted"] = 8 * 511
    df["value"] = [float(np.exp(nll[i].sum() / (8 * 511))) for i in range(len(df))]
    board = build_leaderboard(df, "ppl", task="wikitext2", model="m")
    interval = board.intervals[("rtn", "mxfp4")]
    assert interval.low < board.mean.loc["rtn", "mxfp4"] < interval.high
    cell = board.cells().loc["rtn", "mxfp4"]
    assert f"[{interval.low:.3f}, {interval.high:.3f}]" in cell and "±" not in cell
    assert "Brackets: 95% bootstrap interval" in board.to_markdown()


def test_accuracy_cells_carry_their_document_bootstrap_interval():
    import json

    import numpy as np

    df = frame()
    df["task"], df["metric"] = "piqa", "acc"
    rng = np.random.default_rng(0)
    scores = {i: (rng.uniform(size=100) < 0.7).astype(float) for i in range(len(df))}
    df["info.example_scores.acc"] = [json.dumps(scores[i].tolist()) for i in range(len(df))]
    df["value"] = [float(scores[i].mean()) for i in range(len(df))]
    board = build_leaderboard(df, "acc", task="piqa", model="m")
    interval = board.intervals[("rtn", "mxfp4")]
    assert interval.low < board.mean.loc["rtn", "mxfp4"] < interval.high
    assert 0.05 < interval.high - interval.low < 0.3  # about 4 binomial standard errors of 100 documents
