"""Perplexity with the GPTQ/QuaRot protocol.

The corpus text (rows joined as in `harness.data.EVAL_TEXTS`) is tokenised once without special
tokens, cut into non-overlapping windows of `seqlen` tokens (remainder dropped, optional cap on the
number of windows: the first N), and each window predicts its last seqlen-1 tokens from the tokens
before them, exactly like the reference loops (`loss(logits[:, :-1], ids[:, 1:])`). The loss is the
mean next-token NLL over all predicted tokens and PPL = exp(loss). Since every window predicts the
same number of tokens this equals GPTQ's exp(mean over windows of the window mean NLL).
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from harness import progress as progress_mod
from harness.data import ADD_SPECIAL_TOKENS, MAX_EVAL_WINDOWS, encode_eval_text, eval_text_protocol, with_bos
from harness.errors import InvalidValueError
from harness.eval.forward import logit_chunks, make_windows, window_bos_id
from harness.eval.result import EvalResult, NonFiniteError, library_versions, model_device, model_dtype


def windows_for(tokenizer: Any, dataset: str, seqlen: int, max_windows: int | None,
                split: str = "test", bos_token_id: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The evaluation windows of a dataset and the protocol fields describing them. With `bos_token_id`
    each window is BOS + the next seqlen-1 text tokens (still seqlen-1 predicted tokens per window)."""
    ids = encode_eval_text(tokenizer, dataset, split)
    text_len = seqlen - 1 if bos_token_id is not None else seqlen
    windows, cut = make_windows(ids, text_len, max_windows, MAX_EVAL_WINDOWS.get(dataset))
    text = eval_text_protocol(dataset, split)
    rule = ("non-overlapping, remainder dropped, first N windows when capped; each window predicts seqlen-1 "
            "tokens")
    if bos_token_id is not None:
        windows = with_bos(windows, bos_token_id)
        cut = {**cut, "seqlen": seqlen, "tokens_evaluated": windows.numel(), "tokens_predicted": windows.shape[0] * (seqlen - 1)}
        rule += "; BOS + seqlen-1 text tokens per window (the model needs BOS)"
    protocol = {"dataset": dataset, "split": text["split"], "text": text, **cut,
                "add_special_tokens": ADD_SPECIAL_TOKENS, "bos_per_window": bos_token_id is not None,
                "window_rule": rule}
    return windows, protocol


def window_nlls(model: Any, windows: torch.Tensor, batch_size: int = 1, progress: bool = False,
                desc: str = "ppl") -> torch.Tensor:
    """Per window, the fp64 sum of its seqlen-1 next-token NLLs: float64 [W] (paired comparisons and
    bootstrap intervals resample these)."""
    if batch_size < 1:
        raise InvalidValueError("batch_size", batch_size, "a positive integer")
    per_window = torch.zeros(windows.shape[0], dtype=torch.float64)
    predicted = windows.shape[1] - 1
    bar = progress_mod.bar(total=windows.shape[0], desc=desc, unit="win") if progress else None
    try:
        with torch.inference_mode():
            for b in range(0, windows.shape[0], batch_size):
                batch = windows[b:b + batch_size]
                try:
                    for offset, logits, targets in logit_chunks(model, batch):
                        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
                        rows = b + (offset + torch.arange(targets.numel())) // predicted
                        per_window.index_add_(0, rows, nll)
                except NonFiniteError as exc:
                    raise NonFiniteError(f"{exc} (windows {b}..{b + batch.shape[0] - 1})") from None
                if bar is not None:
                    bar.update(batch.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return per_window


def nll_sum(model: Any, windows: torch.Tensor, batch_size: int = 1, progress: bool = False,
            desc: str = "ppl") -> tuple[float, int]:
    """(sum of next-token NLLs in fp64, number of predicted tokens) over windows [W, T]."""
    per_window = window_nlls(model, windows, batch_size, progress, desc)
    return float(per_window.sum()), per_window.numel() * (windows.shape[1] - 1)


def perplexity(model: Any, tokenizer: Any, dataset: str = "wikitext2", seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = False,
               split: str = "test") -> EvalResult:
    """Perplexity of `model` on `dataset` ("wikitext2", "c4", "ptb") with the GPTQ/QuaRot protocol."""
    windows, protocol = windows_for(tokenizer, dataset, seqlen, max_windows, split, window_bos_id(model, tokenizer))
    start = time.perf_counter()
    per_window = window_nlls(model, windows, batch_size, progress, desc=f"ppl {dataset}")
    seconds = time.perf_counter() - start
    nll = float(per_window.sum()) / (per_window.numel() * (seqlen - 1))
    ppl = math.exp(nll)
    if not math.isfinite(ppl):
        raise NonFiniteError(f"perplexity overflowed: mean NLL {nll:.4g} on {dataset}")
    protocol.update({
        "kind": "ppl", "metric": "ppl", "loss": "mean next-token NLL over all predicted tokens (fp32 "
        "log-softmax, fp64 sum); ppl = exp(loss)", "dtype": model_dtype(model),
        "device": str(model_device(model)), "batch_size": batch_size, "seed": None,
        "versions": library_versions(),
    })
    return EvalResult(value=ppl, metric="ppl", protocol=protocol,
                      extra={"nll": nll, "window_nll": per_window.tolist(),
                             "seconds": round(seconds, 3),
                             "tokens_per_s": round(windows.numel() / seconds, 1) if seconds > 0 else None})
