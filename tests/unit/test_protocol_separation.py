"""Numbers of different evaluation protocols are never combined (#20.1): the probe's FP cell showed the mean of
20.71 (2048 x 16 windows), 37.10 (256 x 4) and 39.97 (256 x 8), and every 8-bit scheme a negative gap to FP."""
from __future__ import annotations

import pytest

from harness.report.leaderboard import MixedProtocolError, build_leaderboard, build_leaderboards, by_protocol
from harness.store import Store, load_results

# (method, scheme, seqlen, max_windows) -> ppl
RUNS = {("fp", "w16a16", 2048, 16): 20.71, ("fp", "w16a16", 256, 4): 37.10, ("fp", "w16a16", 256, 8): 39.97,
        ("rtn", "w8a8", 2048, 16): 20.90, ("rtn", "w8a8", 256, 4): 37.50, ("rtn", "w4a4", 256, 4): 60.0}


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "res")
    for i, ((method, scheme, seqlen, windows), ppl) in enumerate(RUNS.items()):
        store.write({"run_id": f"run{i}", "status": "done", "spec": "s", "model": "smollm2-135m", "task": "wikitext2",
                     "task_kind": "ppl", "method": method, "method_label": method, "scheme": scheme, "seed": 0,
                     "protocol": {"seqlen": seqlen, "max_windows": windows, "threads": 2, "dataset_sha256": "abc"},
                     "metrics": {"ppl": ppl}, "main_metric": "ppl"})
    return store


def test_each_protocol_gets_its_own_table_and_its_own_fp_gap(store):
    df = load_results(store.root)
    boards = build_leaderboards(df, "ppl", "wikitext2", "smollm2-135m")
    assert len(boards) == 3
    by_title = {b.title.split(" — ")[-1]: b for b in boards}
    short = by_title["max_windows=4, seqlen=256, threads=2"]
    assert short.baseline == 37.10 and short.mean.loc["rtn", "w8a8"] == 37.50  # gap +0.40, not -9.7
    assert short.n.loc["fp", "w16a16"] == 1  # one run: no pooled "± 10.390"
    assert by_title["max_windows=16, seqlen=2048, threads=2"].baseline == 20.71
    assert "-" not in short.cells().loc["rtn", "w8a8"].split("(")[1]


def test_asking_for_one_table_over_two_protocols_is_an_error(store):
    df = load_results(store.root)
    with pytest.raises(MixedProtocolError) as err:
        build_leaderboard(df, "ppl", task="wikitext2", model="smollm2-135m")
    assert "3 evaluation protocols" in str(err.value) and "\n" not in str(err.value)


def test_plots_refuse_to_pool_protocols(store, tmp_path):
    from harness.report import plots

    df = load_results(store.root)
    for make in (plots.format_bars, plots.fp_gap_heatmap, plots.metric_vs_bits, plots.cost_scatter):
        with pytest.raises(MixedProtocolError):
            make(df, "ppl", tmp_path / "plots", task="wikitext2", model="smollm2-135m")
    for _, rows in by_protocol(df):
        assert plots.format_bars(rows, "ppl", tmp_path / "plots", task="wikitext2", model="smollm2-135m")


def test_cli_table_and_site_show_one_table_per_protocol(store, capsys):
    from harness.cli import main

    assert main(["table", "--results-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert out.count("### ppl") == 3 and "32.596" not in out and "± " not in out
    assert main(["site", "--results-dir", str(store.root)]) == 0
    page = (store.root / "site" / "index.html").read_text()
    assert page.count("<h3>ppl") == 3 and "seqlen=2048" in page and "seqlen=256" in page
    tables = (store.root / "leaderboard" / "leaderboard.md").read_text()
    assert tables.count("### ppl") == 3


def test_a_failed_run_stays_in_its_protocols_table(store):
    store.write({"run_id": "bad", "status": "failed", "error": "boom", "spec": "s", "model": "smollm2-135m",
                 "task": "wikitext2", "task_kind": "ppl", "method": "rtn", "method_label": "rtn", "scheme": "w4a4",
                 "seed": 0, "protocol": {"seqlen": 2048, "max_windows": 16, "threads": 2}, "metrics": {}})
    boards = {b.title.split(" — ")[-1]: b for b in build_leaderboards(load_results(store.root), "ppl", "wikitext2",
                                                                      "smollm2-135m")}
    assert boards["max_windows=16, seqlen=2048, threads=2"].failed.loc["rtn", "w4a4"]
    assert not boards["max_windows=4, seqlen=256, threads=2"].failed.loc["rtn", "w4a4"]


def test_a_diverged_run_shows_its_value(store):
    """(#20.6) The README says a diverged run keeps its value; the table showed a bare "failed"."""
    store.write({"run_id": "div", "status": "failed", "error": "[eval] RunFailure: diverged: ppl=2.5e+05 on wikitext2",
                 "spec": "s", "model": "smollm2-135m", "task": "wikitext2", "task_kind": "ppl", "method": "rtn",
                 "method_label": "rtn", "scheme": "w2a2", "seed": 0,
                 "protocol": {"seqlen": 256, "max_windows": 4, "threads": 2}, "metrics": {"ppl": 2.5e5}})
    boards = {b.title.split(" — ")[-1]: b for b in build_leaderboards(load_results(store.root), "ppl", "wikitext2",
                                                                      "smollm2-135m")}
    assert boards["max_windows=4, seqlen=256, threads=2"].cells().loc["rtn", "w2a2"] == "diverged (2.5e+05)"
