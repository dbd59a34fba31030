"""The ptqbench CLI in subprocesses: kill -9 and resume, one-line errors, determinism, show/table/export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
import engine_fakes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BOOT = ("import sys; sys.path.insert(0, {fx!r}); import engine_fakes; engine_fakes.install(); "
        "from harness.cli import main; sys.exit(main(sys.argv[1:]))").format(fx=str(FIXTURES))


def env():
    e = dict(os.environ, PTQBENCH_PROGRESS="0", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    e.pop("PTQBENCH_RESULTS_DIR", None)
    return e


def toy_cli(*args, check=None, **kw):
    """`ptqbench ARGS` with the toy world installed."""
    proc = subprocess.run([sys.executable, "-c", BOOT, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env(), timeout=300, **kw)
    if check is not None:
        assert proc.returncode == check, proc.stderr[-3000:]
    return proc


def last_line(stderr: str) -> str:
    # ignore third-party import noise; ptqbench's own message is its last stderr line
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("ptqbench")]
    return lines[-1] if lines else ""


MATRIX = """
name: killme
models: [tiny-a]
methods: [fp, {name: toy_sleepy, params: {seconds: 0.4}}, toy_calib]
schemes: [w8, w4, w3]
tasks: [toy_ppl, toy_ppl2]
ppl: {seqlen: 16, max_windows: 2}
calib: {n: 2, seqlen: 16}
"""


def expected_ids(path, monkeypatch):
    engine_fakes.install(monkeypatch)
    from harness.spec import load_spec

    return {rid for c in load_spec(path).cells() for rid in c.run_ids.values()}


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, monkeypatch):
    spec = tmp_path / "m.yaml"
    spec.write_text(MATRIX)
    results = tmp_path / "res"
    runs = results / "runs"
    proc = subprocess.Popen([sys.executable, "-c", BOOT, "run", str(spec), "--results-dir", str(results),
                             "--no-track"], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (runs.is_dir() and any(runs.glob("*.json"))):
        assert proc.poll() is None, "the matrix ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    expected = expected_ids(spec, monkeypatch)
    before = {p.stem for p in runs.glob("*.json")}
    assert 0 < len(before) < len(expected)  # killed mid-matrix

    toy_cli("run", spec, "--results-dir", results, "--no-track", check=0)
    files = sorted(runs.glob("*.json"))
    ids = [json.loads(p.read_text())["run_id"] for p in files]  # every file is complete JSON
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert all(json.loads(p.read_text())["status"] == "done" for p in files)
    # a third run has nothing left to do
    out = toy_cli("run", spec, "--results-dir", results, "--no-track", check=0)
    assert f"{len(expected)} skipped" in out.stderr


@pytest.fixture
def cli(monkeypatch, capsys):
    """`ptqbench ARGS` in this process with the toy world: returns (exit status, stdout, stderr)."""
    engine_fakes.install(monkeypatch)
    monkeypatch.setenv("PTQBENCH_PROGRESS", "0")
    monkeypatch.delenv("PTQBENCH_RESULTS_DIR", raising=False)
    from harness.cli import main

    def call(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def test_failed_cells_are_recorded_and_exit_status_is_1(tmp_path, cli):
    spec = tmp_path / "f.yaml"
    spec.write_text("models: [tiny-a]\nmethods: [toy_rtn, toy_raise]\nschemes: [w4, nan_scheme]\n"
                    "tasks: [toy_ppl]\nppl: {seqlen: 16, max_windows: 1}\n")
    code, _, err = cli("run", spec, "--results-dir", tmp_path / "res", "--no-track")
    assert code == 1 and "1 done, 3 failed" in err
    records = [json.loads(p.read_text()) for p in (tmp_path / "res" / "runs").glob("*.json")]
    status = {(r["method"], r["scheme"]): r["status"] for r in records}
    assert status == {("toy_rtn", "w4"): "done", ("toy_rtn", "nan_scheme"): "failed",
                      ("toy_raise", "w4"): "failed", ("toy_raise", "nan_scheme"): "failed"}


def test_two_processes_give_identical_numbers(tmp_path):
    spec = tmp_path / "d.yaml"
    spec.write_text(MATRIX.replace("seconds: 0.4", "seconds: 0.0") + "seeds: [0, 7]\n")
    for name in ("a", "b"):
        toy_cli("run", spec, "--results-dir", tmp_path / name, "--no-track", check=0)
    a = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "a" / "runs").glob("*.json")}
    b = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "b" / "runs").glob("*.json")}
    assert a.keys() == b.keys() and len(a) == 2 * (1 + 3 * 2 + 3 * 2)  # fp; toy_sleepy and toy_calib x 2 seeds
    for rid in a:
        assert a[rid]["metrics"]["ppl"] == b[rid]["metrics"]["ppl"]
        assert a[rid]["metrics"]["nll"] == b[rid]["metrics"]["nll"]


def test_show_table_export_and_dry_run(tmp_path, cli):
    spec = tmp_path / "s.yaml"
    spec.write_text("models: [tiny-a]\nmethods: [fp, toy_rtn]\nschemes: [w8, w4]\ntasks: [toy_ppl]\n"
                    "ppl: {seqlen: 16, max_windows: 1}\n")
    res = tmp_path / "res"
    code, out, _ = cli("run", spec, "--results-dir", res, "--dry-run")
    assert code == 0 and out.count("  todo  ") == 3 and "3 cells, 3 runs, 0 already recorded" in out
    assert cli("run", spec, "--results-dir", res, "--no-track")[0] == 0
    assert cli("run", spec, "--results-dir", res, "--dry-run")[1].count("  skip  ") == 3
    rid = next((res / "runs").glob("*.json")).stem
    code, out, _ = cli("show", rid[:6], "--results-dir", res)
    assert code == 0 and json.loads(out)["run_id"] == rid
    code, table, _ = cli("table", "--results-dir", res)
    assert code == 0 and "ppl — tiny-a — toy_ppl" in table and "| toy_rtn" in table and "w16a16" in table
    assert cli("export", tmp_path / "r.parquet", "--results-dir", res)[0] == 0
    assert set(pd.read_parquet(tmp_path / "r.parquet")["method"]) == {"fp", "toy_rtn"}
    code, out, _ = cli("list", "methods")
    assert code == 0 and {"fp", "rtn", "gptq", "toy_rtn"} <= {ln.split()[0] for ln in out.splitlines()}
    code, out, _ = cli("list", "executors")
    assert "local" in out.split()


BAD_CLI = [
    (["run", "{d}/missing.yaml"], "cannot read spec"),
    (["run", "{d}/bad.yaml"], "malformed YAML"),
    (["run", "{d}/ok.yaml", "--scale", "huge"], "unknown scale 'huge'; choose one of: smoke"),
    (["run", "{d}/ok.yaml", "--executor", "slurm"], "unknown executor 'slurm'; choose one of: local"),
    (["run", "{d}/unknown_method.yaml"], "unknown method 'gptqq'; choose one of: "),
    (["show", "nope", "--results-dir", "{d}"], "unknown run id"),
]


@pytest.mark.parametrize("argv, message", BAD_CLI, ids=[b[1][:20] for b in BAD_CLI])
def test_errors_are_one_line_without_traceback(tmp_path, cli, argv, message):
    (tmp_path / "bad.yaml").write_text("models: [tiny-a\n")
    (tmp_path / "ok.yaml").write_text("models: [tiny-a]\nmethods: [fp]\nschemes: [w4]\ntasks: [toy_ppl]\n"
                                      "scales:\n  smoke: {seeds: [0]}\n")
    (tmp_path / "unknown_method.yaml").write_text("models: [tiny-a]\nmethods: [gptqq]\nschemes: [w4]\ntasks: [toy_ppl]\n")
    code, out, err = cli(*[a.format(d=tmp_path) for a in argv])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ptqbench: error: ") and message in err, err


def test_error_in_a_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("models: [tiny-a]\nmethods: [fp]\nschemes: [w4]\ntasks: [wikitext3]\n")
    proc = toy_cli("run", tmp_path / "bad.yaml", check=2)
    assert "Traceback" not in proc.stderr
    assert "unknown task 'wikitext3'; choose one of:" in last_line(proc.stderr)


def test_console_script_lists_builtin_and_entry_point_methods():
    exe = Path(sys.executable).parent / "ptqbench"
    if not exe.exists():
        pytest.skip("ptqbench console script not installed in this environment")
    proc = subprocess.run([str(exe), "list", "methods"], capture_output=True, text=True, timeout=120,
                          env={**env(), "PYTHONPATH": str(engine_fakes.PLUGIN_DIST)})
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert {"fp", "rtn", "gptq", "toy_rtn", "toy_calib", "toy_broken"} <= names
    assert "failed to import: ImportError" in proc.stdout
