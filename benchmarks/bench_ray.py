"""Ray executor makespan on a small CPU matrix, and calibration reuse when a task is added.

Matrix: SmolLM2-135M, {rtn x (W4A4, MXFP4), gptq x (W4A16 g64, MXFP4 weights)} on WikiText-2 perplexity
(short windows), on a local Ray cluster with `--workers` CPUs, one worker process per cell.

Records (JSON, default results/bench/ray_makespan.json):
- makespan: wall time from the first submission to the last record (Ray start-up excluded, reported apart);
- the sum of the cells' own times (load + calibrate + apply + eval, measured inside the workers), and
  the ideal makespan = max(sum / workers, longest chain of cells that must run in sequence);
- ratio = makespan / ideal (goal <= 1.15); what the gap is made of (worker start-up, imports) is the
  difference of the two;
- then the same spec plus a KL task: the perplexity runs are skipped as done, and every calibrated
  cell must load its calibration from the cache (`calib_cached` = 1, zero recalibrations).

    python benchmarks/bench_ray.py [--workers 2] [--windows 4] [--out results/bench/ray_makespan.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PTQBENCH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import harness  # noqa: E402,F401  (offline defaults)

SPEC = """
name: ray_bench
models: [smollm2-135m]
methods: [rtn, gptq]
schemes: [w4a4, mxfp4, {{name: w4a16_g64, weight: int4_g64}}, mxfp4_w]
exclude: [{{method: rtn, scheme: [w4a16_g64, mxfp4_w]}}, {{method: gptq, scheme: [w4a4, mxfp4]}}]
tasks: {tasks}
ppl: {{seqlen: 256, max_windows: {windows}}}
calib: {{corpus: c4, n: 8, seqlen: 256}}
"""


def cell_seconds(record: dict) -> float:
    t = record.get("timings", {})
    return sum(t.get(k, 0.0) for k in ("load_s", "calibrate_s", "apply_s", "eval_s", "reference_s"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "ray_makespan.json"))
    args = ap.parse_args()

    from harness.driver import run_matrix
    from harness.executors.ray import RayExecutor, init_ray
    from harness.spec import load_spec
    from harness.store import Store

    work = Path(tempfile.mkdtemp(prefix="ptqbench-raybench-"))
    store = Store(work / "results")
    spec = work / "spec.yaml"
    spec.write_text(SPEC.format(tasks="[wikitext2]", windows=args.windows))

    t0 = time.perf_counter()
    init_ray(num_cpus=args.workers)
    ray_start = time.perf_counter() - t0

    cells = load_spec(spec).cells()
    t0 = time.perf_counter()
    summary = run_matrix(cells, store, executor=RayExecutor(num_cpus=args.workers))
    makespan = time.perf_counter() - t0
    records = store.records()
    per_cell = {r["run_id"]: round(cell_seconds(r), 2) for r in records}
    total = sum(per_cell.values())
    ideal = max(total / args.workers, max(per_cell.values()))  # cells here share no calibration: no chains

    spec.write_text(SPEC.format(tasks="[wikitext2, kl]", windows=args.windows))
    t0 = time.perf_counter()
    again = run_matrix(load_spec(spec).cells(), store, executor=RayExecutor(num_cpus=args.workers))
    rerun_seconds = time.perf_counter() - t0
    kl = [r for r in store.records() if r["task"] == "kl"]
    calibrated = [r for r in kl if r["method"] == "gptq"]

    result = {
        "benchmark": "ray_makespan",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "workers": args.workers,
        "matrix": {"cells": len(cells), "done": summary.done, "failed": summary.failed,
                   "ppl": {"seqlen": 256, "windows": args.windows}, "calib": {"corpus": "c4", "n": 8, "seqlen": 256}},
        "ray_start_seconds": round(ray_start, 2),
        "makespan_seconds": round(makespan, 2),
        "cell_seconds": per_cell,
        "sum_cell_seconds": round(total, 2),
        "ideal_makespan_seconds": round(ideal, 2),
        "ratio_makespan_to_ideal": round(makespan / ideal, 3),
        "goal_ratio": 1.15,
        "rerun_with_kl_task": {
            "seconds": round(rerun_seconds, 2), "skipped_done_runs": again.skipped, "new_runs": again.done,
            "failed": again.failed,
            "calibrated_cells": len(calibrated),
            "recalibrations": sum(1 for r in calibrated if r["metrics"].get("calib_cached") != 1.0),
        },
        "note": "cell seconds are measured inside the workers (load+calibrate+apply+eval); the makespan "
                "also holds each worker's process start and imports (one fresh process per cell)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
