"""Records say which code they executed (harness.fingerprint), and a rerun adopts a record whose
executed code is unchanged instead of recomputing it; an edit to code it ran makes it recompute."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import fingerprint as fp

ROOT = Path(__file__).resolve().parents[2]
MODULE = '''
"""A toy module."""
SCALE = 2


def used(x):
    return [v * SCALE for v in helper(x)]


def helper(x):
    return [v + 1 for v in x]  # a comprehension counts as helper


def unused(x):
    return x


class K:
    factor = 3

    def run(self, x):
        return used(x)
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_fp_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield pkg
    for name in [m for m in sys.modules if m.startswith("toy_fp_pkg")]:
        del sys.modules[name]
    fp._EXTRA_TOPS.discard("toy_fp_pkg")


@pytest.fixture
def recording(monkeypatch):
    if sys.gettrace() is not None:
        pytest.skip("another trace function is active (debugger / coverage)")
    saved = set(fp._SEEN)
    fp._SEEN.clear()
    sys.settrace(fp._trace)  # start() refuses in a process that already ran engine code: force it here
    monkeypatch.setitem(fp._STATE, "active", True)
    monkeypatch.setitem(fp._STATE, "complete", True)
    monkeypatch.setitem(fp._STATE, "started_ns", time.time_ns())  # after the package was written
    yield
    sys.settrace(None)
    fp._SEEN.clear()
    fp._SEEN.update(saved)


def _edit(pkg: Path, old: str, new: str) -> None:
    path = pkg / "mod.py"
    path.write_text(path.read_text().replace(old, new))
    fp._module_digests.cache_clear()


def test_records_list_the_functions_that_ran_and_survive_edits_elsewhere(package, recording):
    fp.track_package("toy_fp_pkg")
    mod = importlib.import_module("toy_fp_pkg.mod")
    assert mod.K().run([1, 2]) == [4, 6]
    executed = fp.snapshot()
    sys.settrace(None)
    entry = executed["toy_fp_pkg.mod"]
    assert set(entry["functions"]) == {"K.run", "used", "helper"}  # not `unused`
    assert fp.still_current(executed)
    _edit(package, "    return x\n", "    return list(x)\n")  # a function that did not run
    _edit(package, "class K:", "def added():\n    return 1\n\n\nclass K:")  # a new function
    _edit(package, "# a comprehension counts as helper", "# reworded comment")
    assert fp.still_current(executed)
    _edit(package, "v + 1 for", "v + 10 for")  # inside the comprehension of a function that ran
    assert not fp.still_current(executed)
    _edit(package, "v + 10 for", "v + 1 for")
    assert fp.still_current(executed)
    for old, new in (("SCALE = 2", "SCALE = 20"), ("factor = 3", "factor = 30")):  # module / class level
        _edit(package, old, new)
        assert not fp.still_current(executed)
        _edit(package, new, old)


def test_nothing_is_recorded_unless_tracing_started_before_the_engine_ran():
    assert "harness.runner" in sys.modules or importlib.import_module("harness.runner")
    if sys.gettrace() is None:
        assert fp.start() is False and sys.gettrace() is None  # the engine is already imported here
    assert fp.snapshot() is None
    assert fp.merge({"m": {"skeleton": "a", "functions": {}}}, None) is None
    assert fp.merge({"m": {"skeleton": "a", "functions": {"f": "1"}}},
                    {"m": {"skeleton": "a", "functions": {"f": "2"}}}) is None  # two versions of one function


SPEC = """name: fpcheck
models: [tiny-llama]
methods: [fp, rtn, gptq]
schemes: [w4a16]
tasks: [wikitext2]
ppl: {seqlen: 32, max_windows: 2}
calib: {corpus: wikitext2, n: 2, seqlen: 32}
"""


def _cli(spec: Path, results: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(spec), "--results-dir", str(results),
                          "--no-track"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def _records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}


def test_a_rerun_adopts_unchanged_records_and_recomputes_a_changed_one(tmp_path):
    spec, results = tmp_path / "s.yaml", tmp_path / "res"
    spec.write_text(SPEC)
    _cli(spec, results)
    first = _records(results)
    assert len(first) == 3 and all(r["code_executed"] and r["identity"] for r in first.values())
    gptq = next(r for r in first.values() if r["method"] == "gptq")
    assert "GPTQ.calibrate" in gptq["code_executed"]["methods.gptq"]["functions"]
    # as if the engine had changed: the same runs under other (older) ids and code hashes
    for rid, record in first.items():
        (results / "runs" / f"{rid}.json").unlink()
        old = "0000" + rid[4:]
        (results / "runs" / f"{old}.json").write_text(json.dumps({**record, "run_id": old, "code": "0" * 16}))
    out = _cli(spec, results)
    assert "3 adopted" in out
    adopted = {rid: r for rid, r in _records(results).items() if not rid.startswith("0000")}
    assert set(adopted) == set(first)
    for rid, record in adopted.items():
        assert record["adopted_from"] == "0000" + rid[4:] and record["code"] == first[rid]["code"]
        assert record["metrics"] == first[rid]["metrics"]
    # an old record that ran a function which differs now is recomputed, the others stay adopted
    rtn_id = next(rid for rid, r in first.items() if r["method"] == "rtn")
    old_path = results / "runs" / f"0000{rtn_id[4:]}.json"
    tampered = json.loads(old_path.read_text())
    tampered["code_executed"]["harness.runner"]["functions"]["run_cell"] = "0" * 16
    old_path.write_text(json.dumps(tampered))
    (results / "runs" / f"{rtn_id}.json").unlink()
    out = _cli(spec, results)
    assert "1 done" in out and "adopted" not in out
    assert "adopted_from" not in _records(results)[rtn_id]
    # a cached calibration brings the code of the process that computed it
    gptq_id = next(rid for rid, r in first.items() if r["method"] == "gptq")
    for rid in (gptq_id, "0000" + gptq_id[4:]):
        (results / "runs" / f"{rid}.json").unlink()
    _cli(spec, results)
    again = _records(results)[gptq_id]
    assert again["metrics"]["calib_cached"] == 1.0
    assert "GPTQ.calibrate" in again["code_executed"]["methods.gptq"]["functions"]
