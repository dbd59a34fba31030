"""Fake-quant throughput of the number formats next to a plain tensor copy (the bandwidth limit).

Throughput counts bytes read + bytes written, for the copy and for every format alike.
Writes JSON (default results/bench/formats.json). Run: `make bench` or
`python benchmarks/bench_formats.py --size 4096 --repeats 5`.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import harness
from harness.formats import get_format, quantize

# (label, format name, overrides); int4 = symmetric, one scale per row (per token)
FORMATS = [
    ("mxfp4", "mxfp4", {}),
    ("mxfp4 floor43", "mxfp4", {"scale_rounding": "floor43"}),  # FP-Quant's E8M0 rule (MR-GPTQ)
    ("nvfp4", "nvfp4", {}),
    ("nvfp4_4o6", "nvfp4_4o6", {}),  # Four Over Six: two candidate codes per block, the lower-MSE one kept
    ("int4", "int4", {}),
]


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, where there is any)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def torchao_mx_emulation(x: torch.Tensor):
    """torchao's MXFP4 emulation (quantize + dequantize), if torchao is installed."""
    try:
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
    except Exception as exc:  # not installed or not importable on this platform
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]

    def run():
        return MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)

    try:
        run()
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return run, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/bench/formats.json")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(args.size, args.size, device=device, generator=None)
    moved_bytes = 2 * x.numel() * x.element_size()  # read input + write output
    rows = {}

    def record(name: str, fn) -> None:
        seconds = best_time(fn, args.repeats)
        rows[name] = {"seconds": seconds, "GB_per_s": moved_bytes / seconds / 1e9}
        print(f"{name:28s} {seconds * 1e3:9.2f} ms  {rows[name]['GB_per_s']:7.2f} GB/s", flush=True)

    record("copy", lambda: x.clone())
    for name, base, overrides in FORMATS:
        fmt = get_format(base, **overrides)
        record(f"{name} (torch eager)", lambda fmt=fmt: quantize(x, fmt, backend="torch"))
        record(f"{name} (torch.compile)", lambda fmt=fmt: quantize(x, fmt, backend="compiled"))
        if device == "cuda":
            record(f"{name} (triton)", lambda fmt=fmt: quantize(x, fmt, backend="triton"))
    ao_fn, ao_error = torchao_mx_emulation(x)
    if ao_fn is not None:
        record("mxfp4 (torchao MXTensor)", ao_fn)
    copy = rows["copy"]["GB_per_s"]
    result = {
        "benchmark": "fake-quant throughput",
        "tensor": {"shape": list(x.shape), "dtype": str(x.dtype), "device": device},
        "throughput_counts": "bytes read + bytes written",
        "results": rows,
        "slowdown_vs_copy": {k: copy / v["GB_per_s"] for k, v in rows.items()},
        "torchao": "measured" if ao_fn else f"not measured: {ao_error}",
        "torch_threads": torch.get_num_threads(),
        "versions": {"ptqbench": harness.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
