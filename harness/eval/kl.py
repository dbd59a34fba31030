"""KL divergence of a (quantized) model to the FP model's next-token distributions.

`collect_reference` runs the FP model on the perplexity windows and keeps, for every predicted
position, the FP top-k log-probabilities, their token ids, the log of the remaining mass (the
"tail") and the FP argmax. `kl_to_reference` runs another model on the same windows and computes

    KL(P || Q) over k+1 bins: the FP top-k tokens plus one tail bucket holding everything else,

i.e. sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail), with q_tail the quantized
model's mass outside the FP top-k, both computed from full logits. Merging the tail into one bin
can only lower the KL (data processing inequality), so this is a lower bound of the full-vocabulary
KL that becomes exact as k grows; extra["fp_topk_mass"] reports how much FP mass the top-k holds.
Identical logits give exactly 0 (same windows, same batch size, same arithmetic).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.errors import InvalidValueError
from harness.eval.forward import logit_chunks, window_bos_id
from harness.eval.ppl import windows_for
from harness.eval.result import EvalResult, library_versions, model_device, model_dtype

DEFAULT_TOPK = 64


@dataclass
class KLReference:
    """FP model outputs on fixed windows: top-k log-probs [W, T-1, k], ids, tail log-mass, argmax."""

    input_ids: torch.Tensor  # [W, T] long
    topk_logp: torch.Tensor  # [W, T-1, k] fp32
    topk_ids: torch.Tensor  # [W, T-1, k] int32
    tail_logp: torch.Tensor  # [W, T-1] fp32: log of the FP mass outside the top-k
    top1: torch.Tensor  # [W, T-1] long: FP argmax
    batch_size: int = 1
    protocol: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "topk_logp": self.topk_logp, "topk_ids": self.topk_ids,
                "tail_logp": self.tail_logp, "top1": self.top1, "batch_size": self.batch_size,
                "protocol": self.protocol}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "KLReference":
        return cls(**d)


def _tail_logp(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids` (per row), from full log-probs [rows, V]."""
    masked = logp.scatter(-1, ids, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def _batches(model: Any, windows: torch.Tensor, batch_size: int):
    for b in range(0, windows.shape[0], batch_size):
        batch = windows[b:b + batch_size]
        for offset, logits, _ in logit_chunks(model, batch):
            yield b * (windows.shape[1] - 1) + offset, logits


def collect_reference(model: Any, tokenizer: Any, dataset: str = "wikitext2", seqlen: int = 512,
                      max_windows: int | None = 8, topk: int = DEFAULT_TOPK, batch_size: int = 1,
                      split: str = "test") -> KLReference:
    """Run the FP model on the perplexity windows of `dataset` and keep what KL needs."""
    if topk < 1:
        raise InvalidValueError("topk", topk, "a positive integer")
    windows, protocol = windows_for(tokenizer, dataset, seqlen, max_windows, split, window_bos_id(model, tokenizer))
    n_rows = windows.shape[0] * (seqlen - 1)
    logp_out = torch.empty(n_rows, topk, dtype=torch.float32)
    ids_out = torch.empty(n_rows, topk, dtype=torch.int32)
    tail_out = torch.empty(n_rows, dtype=torch.float32)
    top1_out = torch.empty(n_rows, dtype=torch.long)
    with torch.inference_mode():
        for row, logits in _batches(model, windows, batch_size):
            logp = torch.log_softmax(logits, dim=-1)
            vals, idx = logp.topk(topk, dim=-1)
            end = row + logits.shape[0]
            logp_out[row:end], ids_out[row:end] = vals.cpu(), idx.to(torch.int32).cpu()
            tail_out[row:end] = _tail_logp(logp, idx).cpu()
            top1_out[row:end] = logits.argmax(dim=-1).cpu()
    shape = (windows.shape[0], seqlen - 1)
    protocol.update({"kind": "kl_reference", "topk": topk, "fp_dtype": model_dtype(model), "batch_size": batch_size})
    return KLReference(windows, logp_out.view(*shape, topk), ids_out.view(*shape, topk), tail_out.view(shape),
                       top1_out.view(shape), batch_size, protocol)


def kl_to_reference(model: Any, reference: KLReference, batch_size: int | None = None) -> EvalResult:
    """Mean KL(FP || model) per predicted token over the FP top-k plus a tail bucket; top-1 agreement in extra."""
    batch_size = batch_size or reference.batch_size
    windows = reference.input_ids
    k = reference.topk_logp.shape[-1]
    ref_logp = reference.topk_logp.reshape(-1, k)
    ref_ids = reference.topk_ids.reshape(-1, k)
    ref_tail = reference.tail_logp.reshape(-1)
    ref_top1 = reference.top1.reshape(-1)
    kl_sum, agree, mass, count = 0.0, 0, 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for row, logits in _batches(model, windows, batch_size):
            end = row + logits.shape[0]
            device = logits.device
            p_logp, idx = ref_logp[row:end].to(device), ref_ids[row:end].to(device).long()
            p_tail = ref_tail[row:end].to(device)
            logq = torch.log_softmax(logits, dim=-1)
            q_logp = logq.gather(-1, idx)
            q_tail = _tail_logp(logq, idx)
            # 0 * log(0/x) = 0: a bin with no FP mass contributes nothing (also keeps -inf - -inf out)
            terms = torch.where(p_logp > float("-inf"), p_logp.exp() * (p_logp - q_logp), 0.0).sum(-1)
            terms = terms + torch.where(p_tail > float("-inf"), p_tail.exp() * (p_tail - q_tail), 0.0)
            kl_sum += float(terms.double().sum())
            agree += int((logits.argmax(dim=-1).cpu() == ref_top1[row:end]).sum())
            mass += float(p_logp.exp().sum(-1).double().sum())
            count += logits.shape[0]
    seconds = time.perf_counter() - start
    protocol = dict(reference.protocol)
    protocol.update({"kind": "kl", "metric": "kl", "kl": "mean over predicted tokens of KL(FP || model) on "
                     f"k+1 bins (FP top-{k} tokens + tail bucket), natural log", "dtype": model_dtype(model),
                     "device": str(model_device(model)), "batch_size": batch_size, "seed": None,
                     "versions": library_versions()})
    return EvalResult(value=kl_sum / count, metric="kl", protocol=protocol,
                      extra={"top1_agreement": agree / count, "fp_topk_mass": mass / count,
                             "tokens": count, "seconds": round(seconds, 3)})
