"""Calibration cost of learned rotations: DartQuant vs SpinQuant on the same model, data and steps.

Both methods learn R1 (residual) and one R2 per layer on the same calibration windows (`--n` x
`--seqlen`, c4 train, seed 0) of the same model (SmolLM2-135M by default), with the same number of
updates of every learned matrix (`--steps`):

* SpinQuant: `--steps` Cayley-SGD steps, each a forward + backward of the whole network with the
  scheme's quantizers in the loop, on `--batches` windows per step (one run per value; the paper uses
  8 windows of 2048 tokens per step, 100 steps). Its cost grows with the tokens per step, DartQuant's
  does not.
* DartQuant: one layer-by-layer FP pass that samples tokens (`--token-fraction` of the norm outputs,
  all o_proj inputs), then `--steps` full-batch SGD steps for each layer's R2 and `--steps` for R1
  (one step per epoch over the sampled tokens), no backpropagation through the LLM.

Only the rotation learning (`build`) is timed: no GPTQ, no evaluation. Each method runs in its own
child process (clean peak RSS). Memory: on CPU, the peak resident set size above what the process held
when `build` started (the model is already loaded then) and the process's lifetime max RSS; on CUDA,
torch.cuda.max_memory_allocated above the start. For scale, "one layer's activations" = the residual
stream of one decoder layer for all calibration windows (n x seqlen x hidden, float32).

    python benchmarks/bench_rotation_calib.py [--steps 20] [--n 8] [--seqlen 256] [--batches 2,8]
        [--scheme w4a4kv4] [--threads 1] [--out results/bench/rotation_calib.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PTQBENCH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def method_params(name: str, args) -> dict:
    if name == "spinquant":
        return {"weight_solver": "rtn", "steps": args.steps, "samples": None, "seqlen": None,
                "batch_size": args.batch}
    # default: one batch holds every sampled token (one step per epoch); --batch-tokens: mini-batches
    big = args.batch_tokens or 1 << 40
    return {"weight_solver": "rtn", "r1_epochs": args.steps, "r1_batch_tokens": big,
            "r1_token_fraction": args.token_fraction, "r2_epochs": args.steps, "r2_batch_tokens": big,
            "r2_accumulation": 1}


def child(args) -> dict:
    """Run one method's rotation learning in this process and return its measurements."""
    import torch

    import harness  # noqa: F401  (offline defaults)
    from harness.method import CalibConfig, CalibContext
    from harness.models import load_model
    from harness.quant import get_scheme
    from harness.registry import get_method

    torch.set_num_threads(args.threads)
    model, tok, adapter = load_model(args.model, device=args.device)
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(args.scheme),
                       calib=CalibConfig(args.corpus, args.n, args.seqlen), seed=0, device=args.device)
    windows = ctx.calib_inputs()
    method = get_method(args.child)(method_params(args.child, args))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    rot = method.build(ctx)
    seconds = time.perf_counter() - t0
    info = rot.info
    steps = int(info["steps"])
    out = {
        "method": args.child, "params": method_params(args.child, args), "seconds": round(seconds, 2),
        "optimizer_steps": steps, "seconds_per_step": round(seconds / max(steps, 1), 4),
        "peak_bytes_above_start": int(info["peak_bytes"]), "peak_kind": info["peak_kind"],
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "process_max_rss_before_build_bytes": rss_before,
        "windows_sha": int(windows.long().sum()), "orthogonality_error": info["orthogonality_error"],
        "model": args.model,
        "geometry": {"hidden": adapter.hidden_size, "layers": adapter.num_layers, "head_dim": adapter.head_dim,
                     "intermediate": adapter.layers()[0].mlp_out[0].in_features},
    }
    if args.child == "spinquant":
        out["training_form"] = info["form"]
        out["loss_first"], out["loss_last"] = info["metrics"]["loss_first"], info["metrics"]["loss_last"]
    else:
        out["pooled_tokens"], out["pooled_bytes"] = info["pooled_tokens"], info["pooled_bytes"]
        out["r1_steps"] = len(info["r1_losses"])
        out["whip_init"], out["whip_final"] = info["metrics"]["r1_whip_init"], info["metrics"]["r1_whip_final"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=20, help="updates of every learned rotation, both methods")
    parser.add_argument("--n", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batches", default="2,8", help="SpinQuant windows per step (one run each)")
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)  # a child's batch
    parser.add_argument("--token-fraction", type=float, default=0.1, help="DartQuant R1 token sample")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="DartQuant tokens per SGD step (default: all sampled tokens, one step per epoch)")
    parser.add_argument("--corpus", default="c4")
    parser.add_argument("--scheme", default="w4a4kv4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="dartquant,spinquant")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "rotation_calib.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    def run_child(name: str, batch: int) -> dict:
        opts = {**vars(args), "batch": batch}
        cmd = [sys.executable, __file__, "--child", name] + [
            a for k, v in opts.items() if k not in ("child", "out", "methods", "batches") and v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))]
        print(f"running {name} (batch {batch}) ...", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {r['seconds']} s, {r['optimizer_steps']} steps, peak +{r['peak_bytes_above_start'] / 2**20:.0f} MiB "
              f"({r['peak_kind']}), process max RSS {r['process_max_rss_bytes'] / 2**20:.0f} MiB", flush=True)
        return r

    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    results = {}
    if "dartquant" in methods:
        results["dartquant"] = run_child("dartquant", batches[0])  # batch is a SpinQuant setting
    if "spinquant" in methods:
        for b in batches:
            results[f"spinquant_batch{b}"] = run_child("spinquant", b)

    summary = {}
    d = results.get("dartquant")
    for key, s in results.items():
        if not key.startswith("spinquant") or d is None:
            continue
        assert d["windows_sha"] == s["windows_sha"], "the two methods saw different calibration windows"
        summary[key] = {
            "tokens_per_step": s["params"]["batch_size"] * args.seqlen,
            "speedup_over_dartquant": round(s["seconds"] / d["seconds"], 2),
            "memory_ratio_over_dartquant": round(s["peak_bytes_above_start"] / max(d["peak_bytes_above_start"], 1), 2),
            "goal_dartquant_20x_faster": s["seconds"] >= 20 * d["seconds"],
        }
    if d is not None:
        g = d["geometry"]
        one_layer = args.n * args.seqlen * g["hidden"] * 4
        summary["dartquant_memory"] = {
            "peak_bytes_above_start": d["peak_bytes_above_start"],
            "pooled_r1_tokens_bytes": d["pooled_bytes"],
            "one_layer_residual_activations_bytes": one_layer,
            "one_layer_mlp_intermediate_bytes": args.n * args.seqlen * g["intermediate"] * 4,
            "peak_over_one_layer_residual": round(d["peak_bytes_above_start"] / one_layer, 2),
            "goal_memory_le_one_layer": d["peak_bytes_above_start"] <= one_layer,
        }
    record = {
        "benchmark": "rotation_calib", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: v for k, v in vars(args).items() if k not in ("child", "out", "batch")},
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
                 "load_average_at_end": os.getloadavg()},
        "results": results, "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
