"""Check that a code change moved no number: rerun committed smoke examples and compare bit for bit.

    python benchmarks/check_numbers.py [--results-dir DIR] [--only smoke,torq,dartquant] [--reference DIR]

Runs, into a scratch results directory, `experiments/smoke.yaml --scale smoke` and the smoke
reproductions of the given papers, then compares every metric value with the records committed
under results/examples/ (smoke: the run records, matched by method label, scheme, task and seed;
papers: the claim values in claims.json). Prints one line per compared value and a summary; exits 1
when any value differs. Run ids may differ (a method version bump), values may not.

`--reference DIR` compares with another results directory instead (e.g. the same command run at the
previous commit in a worktree): its runs/ for smoke and papers/<id>/claims.json for papers. `--no-run`
compares what --results-dir already holds without running anything.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "results" / "examples"
COMPARED = ("ppl", "nll")
#: claim terms that measure cost (time, memory): they differ run to run and are reported, not compared
COST_WORDS = ("seconds", "_mb", "peak", "bytes")


def _records(runs_dir: Path) -> dict[tuple, dict]:
    out = {}
    for path in sorted(runs_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") not in ("done", "failed"):
            continue
        out[(rec["method_label"], rec["scheme"], rec["task"], rec["seed"])] = rec.get("metrics", {})
    return out


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, check=True)


def compare_smoke(results: Path, reference: Path | None, run: bool) -> list[tuple[str, object, object]]:
    if run:
        _cli("run", "experiments/smoke.yaml", "--scale", "smoke", "--results-dir", str(results))
    ours = _records(results / "runs")
    theirs = _records((reference or EXAMPLES / "smoke") / "runs")
    rows = []
    for key, metrics in sorted(theirs.items(), key=str):
        for name in COMPARED:
            if name in metrics:
                rows.append((f"smoke {key} {name}", metrics[name], ours.get(key, {}).get(name)))
    return rows


def compare_paper(paper: str, results: Path, reference: Path | None, run: bool) -> list[tuple[str, object, object]]:
    if run:
        _cli("reproduce", paper, "--scale", "smoke", "--results-dir", str(results))
    # one result per (claim, model); records from before per-model claims have no "model"
    ours = {(c["id"], c.get("model")): c for c in json.loads((results / "papers" / paper / "claims.json").read_text())}
    rows = []
    for claim in json.loads(((reference or EXAMPLES) / "papers" / paper / "claims.json").read_text()):
        for term, value in (claim.get("values") or {}).items():
            if any(word in term for word in COST_WORDS):
                continue
            got = ((ours.get((claim["id"], claim.get("model"))) or {}).get("values") or {}).get(term)
            for stat in ("mean", "std"):
                rows.append((f"{paper} {claim['id']} {term} {stat}", value.get(stat), (got or {}).get(stat)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", default=None, help="scratch results dir (default: a new temp dir)")
    ap.add_argument("--only", default="smoke,torq,dartquant", help="comma list: smoke and/or paper ids")
    ap.add_argument("--reference", default=None, help="results dir to compare with (default: results/examples)")
    ap.add_argument("--no-run", action="store_true", help="compare what --results-dir holds, run nothing")
    args = ap.parse_args(argv)
    results = Path(args.results_dir or tempfile.mkdtemp(prefix="ptqbench-check-"))
    reference = Path(args.reference) if args.reference else None
    rows = []
    for item in args.only.split(","):
        rows += (compare_smoke(results, reference, not args.no_run) if item == "smoke"
                 else compare_paper(item, results, reference, not args.no_run))
    bad = [r for r in rows if r[1] != r[2]]
    for name, want, got in rows:
        print(f"{'same ' if want == got else 'MOVED'} {name}: committed {want!r}, now {got!r}")
    print(f"{len(rows) - len(bad)} same, {len(bad)} moved (results in {results})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
