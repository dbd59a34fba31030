"""GPTQ cost per decoder layer on SmolLM2-135M (hidden 576, MLP 1536, 9 query / 3 KV heads).

The model is cut to its first `--layers` decoder layers (default 1) and `gptq_quantize_model` runs on
`--n` calibration windows of `--seqlen` tokens (default 32 x 512, c4 train, seed 0) for each format.
Per format it records: seconds per layer (hooked FP pass + solves + the pass through quantized weights),
its forward share, the per-linear solve seconds and GPTQ losses, the one-off capture of layer 0's inputs,
and, as a sanity check, the MSE of the last kept layer's output on 4 held-out windows vs full precision,
for GPTQ and for RTN of the same format.

    python benchmarks/bench_gptq.py [--formats int4,int4_g64,mxfp4,nvfp4] [--n 32] [--seqlen 512]
        [--act-order] [--mse-clip] [--true-sequential] [--threads 1] [--out results/bench/gptq_layer.json]

On a small shared CPU, `--threads 1` is much faster and steadier: the solver's column loop is a chain of
small ops, and oversubscribed OpenMP threads make each one wait.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PTQBENCH_DATA_DIR", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import harness  # noqa: E402,F401  (offline defaults)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from harness.data import calibration_windows  # noqa: E402
from harness.formats import quantize  # noqa: E402
from harness.gptq import gptq_quantize_model  # noqa: E402
from harness.models import get_adapter, load_model, model_fingerprint  # noqa: E402


def last_layer_output(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = []
    handle = model.model.layers[-1].register_forward_hook(lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model.model(tokens.to(next(model.parameters()).device))
    finally:
        handle.remove()
    return out[0].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers kept (and quantized)")
    parser.add_argument("--formats", default="int4,int4_g64,mxfp4,nvfp4")
    parser.add_argument("--n", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--corpus", default="c4")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--mse-clip", action="store_true")
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "gptq_layer.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, _ = load_model(args.model, device=args.device)
    model.model.layers = nn.ModuleList(list(model.model.layers)[:args.layers])
    model.config.num_hidden_layers = args.layers
    adapter = get_adapter(model)
    calib = calibration_windows(tokenizer, args.corpus, args.n, args.seqlen, seed=0)
    held_out = calibration_windows(tokenizer, args.corpus, 4, args.seqlen, seed=1)
    reference = last_layer_output(model, held_out)

    def rel_mse(m: nn.Module) -> float:
        return float(((last_layer_output(m, held_out) - reference) ** 2).mean() / (reference**2).mean())

    runs = []
    for fmt in args.formats.split(","):
        rtn = copy.deepcopy(model)
        for weight in get_adapter(rtn).weight_tensors().values():
            weight.data.copy_(quantize(weight.data, fmt))
        work = copy.deepcopy(model)
        start = time.perf_counter()
        weights = gptq_quantize_model(work, get_adapter(work), calib, fmt, block_size=args.block_size,
                                      act_order=args.act_order, mse_clip=args.mse_clip,
                                      true_sequential=args.true_sequential, batch_size=args.batch_size,
                                      progress=lambda it, desc: it)
        total = time.perf_counter() - start
        report = weights.report
        layer_s = [r["seconds"] for r in report["layers"]]
        run = {
            "format": fmt,
            "total_seconds": total,
            "capture_seconds": total - sum(layer_s),
            "seconds_per_layer": sum(layer_s) / len(layer_s),
            "forward_seconds_per_layer": sum(r["forward_seconds"] for r in report["layers"]) / len(layer_s),
            "solve_seconds_per_layer": sum(r["seconds"] for r in report["linears"]) / len(layer_s),
            "linears": [{k: r[k] for k in ("layer", "linear", "shape", "seconds", "error", "damp")}
                        for r in report["linears"]],
            "layer_output_rel_mse": {"gptq": rel_mse(work), "rtn": rel_mse(rtn)},
        }
        runs.append(run)
        print(f"{fmt:>10}: {run['seconds_per_layer']:.2f} s/layer (forward {run['forward_seconds_per_layer']:.2f}, "
              f"solve {run['solve_seconds_per_layer']:.2f}), capture {run['capture_seconds']:.2f} s; "
              f"layer-output rel. MSE gptq {run['layer_output_rel_mse']['gptq']:.3e} "
              f"rtn {run['layer_output_rel_mse']['rtn']:.3e}", flush=True)
        del work, rtn

    import transformers

    result = {
        "benchmark": "gptq_layer",
        "model": model_fingerprint(args.model),
        "settings": {"layers": args.layers, "n_windows": args.n, "seqlen": args.seqlen, "corpus": args.corpus,
                     "calib_seed": 0, "batch_size": args.batch_size, "block_size": args.block_size,
                     "damp": 0.01, "act_order": args.act_order, "mse_clip": args.mse_clip,
                     "true_sequential": args.true_sequential, "device": args.device,
                     "torch_threads": torch.get_num_threads(), "dtype": "float32"},
        "runs": runs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
