"""The prepared GPU checks: one short script to run when a session is lent a CUDA machine (`make gpu-check`).

CI never has a GPU, so what only a GPU can show is checked here, and what it measured is committed
(default results/bench/gpu_check.json):
1. bits: the Triton kernels on the GPU against the torch path on the CPU, for every block format and scale
   option (MX rules incl. FP-Quant's floor43, NVFP4 / NVINT4, Four Over Six's three rules), fp32 and bf16,
   on random, wide-range and tie-heavy inputs. The CPU tests only run the kernels in the interpreter,
   where FMA contraction, denormal flushing and division rounding cannot differ: here they can.
2. the eager torch path on CUDA against the CPU (the same code, other kernels underneath).
3. throughput: Triton vs torch.compile vs eager on CUDA (GB/s of bytes read + written, bf16 input).
4. one GPTQ solve of a 4096 x 4096 layer on the GPU per format (seconds), the scale of an 8B model's layer.
5. INT-FlashAttention's kernel on the GPU against its CPU reference, and its speed against FP16 SDPA.

`--dry-run` runs the same code on the CPU (Triton interpreter, tiny sizes) to check the script itself;
its numbers mean nothing. Exit status 1 when any bit check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

FORMATS = [
    ("mxfp4", {}), ("mxfp4", {"scale_rounding": "floor43"}), ("mxfp4", {"scale_rounding": "ceil"}),
    ("mxfp4", {"scale_rounding": "rceil"}), ("mxfp4", {"scale_rounding": "round"}),
    ("mxfp6_e2m3", {}), ("mxfp6_e3m2", {}), ("mxfp8_e4m3", {}), ("mxfp8_e5m2", {}), ("mxint8", {}), ("mxint4", {}),
    ("mxint8", {"scale_rounding": "floor43"}), ("nvfp4", {}), ("nvint4", {}),
    ("nvfp4", {"four_over_six": "mse"}), ("nvfp4", {"four_over_six": "mae"}), ("nvfp4", {"four_over_six": "abs_max"}),
]


def label(name: str, overrides: dict) -> str:
    return name + "".join(f"[{k}={v}]" for k, v in overrides.items())


def inputs(torch, rows: int, block: int, seed: int):
    """Gaussian, wide-range (exponents spread over ~2^-40 .. 2^40) and tie-heavy rows."""
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(rows, block * 16, generator=g)
    wide = torch.randn(rows, block * 16, generator=g) * torch.exp2(torch.randint(-40, 40, (rows, 1), generator=g).float())
    ties = torch.round(torch.randn(rows, block * 16, generator=g) * 8) / 8
    return {"gaussian": gaussian, "wide": wide, "ties": ties}


def same_bits(torch, a, b) -> bool:
    a, b = a.float().cpu(), b.float().cpu()
    nan = torch.isnan(a) & torch.isnan(b)
    return bool(torch.all((a.view(torch.int32) == b.view(torch.int32)) | nan))


def bit_checks(torch, device: str, rows: int) -> list[dict]:
    from harness.formats import get_format, quantize

    out = []
    for name, overrides in FORMATS:
        fmt = get_format(name, **overrides)
        for kind, x in inputs(torch, rows, fmt.group_size, seed=len(out)).items():
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                want = quantize(xd, fmt, backend="torch")  # CPU reference path
                got_triton = quantize(xd.to(device), fmt, backend="triton")
                got_eager = quantize(xd.to(device), fmt, backend="torch")
                out.append({"format": label(name, overrides), "input": kind, "dtype": str(dtype).split(".")[-1],
                            "triton_equals_cpu": same_bits(torch, got_triton, want),
                            "eager_cuda_equals_cpu": same_bits(torch, got_eager, want)})
    return out


def best_seconds(torch, fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput(torch, device: str, size: int, repeats: int) -> list[dict]:
    from harness.formats import get_format, quantize

    x = torch.randn(size, size, device=device).to(torch.bfloat16)
    moved = 2 * x.numel() * x.element_size()  # read + write
    out = []
    for name, overrides in [("mxfp4", {}), ("mxfp4", {"scale_rounding": "floor43"}), ("nvfp4", {}),
                            ("nvfp4", {"four_over_six": "mse"})]:
        fmt = get_format(name, **overrides)
        row = {"format": label(name, overrides), "size": size}
        for backend in ("triton", "compiled", "torch"):
            try:
                seconds = best_seconds(torch, lambda b=backend: quantize(x, fmt, backend=b), repeats)
                row[f"{backend}_gbps"] = round(moved / seconds / 1e9, 2)
            except Exception as exc:  # a backend that cannot run here is recorded, not fatal
                row[f"{backend}_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        out.append(row)
    return out


def gptq_solves(torch, device: str, size: int) -> list[dict]:
    from harness.gptq import gptq_quantize_weight

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4 * size, size, generator=g).to(device)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(size, size, generator=g).to(device)
    out = []
    for name in ("int4_g128", "mxfp4", "nvfp4", "nvfp4_4o6"):
        start = time.perf_counter()
        q, info = gptq_quantize_weight(w, h, name)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append({"format": name, "size": size, "seconds": round(time.perf_counter() - start, 3),
                    "gptq_loss": info.error, "finite": bool(torch.isfinite(q).all())})
    return out


def int8_flash_check(torch, device: str, seqlen: int) -> dict:
    """INT-FlashAttention's Triton kernel on the device against the torch reference on the CPU (largest
    difference; one INT8 rounding of P = |v| / 127 is the documented bound) and its speed vs FP16 SDPA."""
    from harness.attention.int8_flash import int8_flash_reference
    from harness.attention.int8_flash_triton import int8_flash_triton

    g = torch.Generator().manual_seed(0)
    out = {}
    for variant in ("full", "half"):
        q, k, v = (torch.randn(1, 4, min(seqlen, 1024), 128, generator=g) for _ in range(3))
        ref = int8_flash_reference(q, k, v, 128 ** -0.5, variant)
        got = int8_flash_triton(q.to(device), k.to(device), v.to(device), 128 ** -0.5, variant).cpu()
        out[f"{variant}_max_abs_diff"] = float((got - ref).abs().max())
        out[f"{variant}_one_level"] = float(v.abs().max() / 127)
    if device == "cuda":
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_int8_flash import speed

        out["speed"] = speed()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes (checks the script)")
    parser.add_argument("--out", default="results/bench/gpu_check.json")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    import harness

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run it on a GPU machine, or --dry-run to check the script", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    rows, size, gptq_size, repeats = (4, 256, 128, 1) if args.dry_run else (512, 8192, 4096, 10)
    start = time.perf_counter()
    report = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "harness": getattr(harness, "__version__", "?"),
                     "triton": __import__("triton").__version__, "cuda": torch.version.cuda},
        "bits": bit_checks(torch, device, rows),
        "throughput": throughput(torch, device, size, repeats),
        "gptq": gptq_solves(torch, device, gptq_size),
        "int8_flash": int8_flash_check(torch, device, 256 if args.dry_run else 4096),
    }
    failed = [r for r in report["bits"] if not (r["triton_equals_cpu"] and r["eager_cuda_equals_cpu"])]
    report["bit_failures"] = len(failed)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: {len(report['bits'])} bit checks, {len(failed)} failed; wrote {out} ({report['seconds']} s)")
    for r in failed:
        print(f"  FAILED {r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
