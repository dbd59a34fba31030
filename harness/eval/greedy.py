"""Greedy-generation agreement with the FP model: does the quantized model keep writing what the FP model writes?

`collect_greedy_reference` lets the FP model continue `prompts` prompts (the first tokens of the evaluation
windows of a text) by `new_tokens` greedy tokens, decoding token by token with a cache. `greedy_agreement`
then runs the quantized model once over prompt + FP continuation (teacher forcing) and compares its argmax
at every generated position with the FP token:
- `greedy_agreement`: the fraction of generated steps where it picks the FP token;
- `first_divergence`: the mean number of steps before its first different pick, which is exactly how
  long its own free-running greedy generation stays identical to the FP one (up to that step the two
  histories are the same).
Under a KV policy the teacher-forced forward reads the cache as decoding would (harness.kv), so these are
decoding numbers. Per-prompt scores are kept for paired intervals between runs on the same prompts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.eval.forward import window_bos_id
from harness.eval.ppl import windows_for
from harness.eval.result import EvalResult, library_versions, model_device, model_dtype


@dataclass
class GreedyReference:
    """The FP model's greedy continuations: sequences [prompts, prompt_len + new_tokens]."""

    sequences: torch.Tensor
    prompt_len: int
    protocol: dict[str, Any] = field(default_factory=dict)


def greedy_continue(model: Any, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompts [P, T] continued by `new_tokens` argmax tokens, one at a time through a KV cache."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = prompt[None].to(device)
            cache = DynamicCache(config=model.config)
            logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
            steps = []
            for _ in range(new_tokens):
                token = logits.argmax(-1, keepdim=True)
                steps.append(token)
                logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(torch.cat([ids, *steps], dim=1)[0].cpu())
    return torch.stack(out)


def collect_greedy_reference(model: Any, tokenizer: Any, dataset: str = "wikitext2", prompt_len: int = 256,
                             new_tokens: int = 64, prompts: int = 8, split: str = "test") -> GreedyReference:
    windows, protocol = windows_for(tokenizer, dataset, prompt_len, prompts, split, window_bos_id(model, tokenizer))
    protocol.update({"kind": "greedy_reference", "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "prompts": int(windows.shape[0]), "fp_dtype": model_dtype(model)})
    return GreedyReference(greedy_continue(model, windows, new_tokens), prompt_len, protocol)


def greedy_agreement(model: Any, reference: GreedyReference) -> EvalResult:
    seqs, p = reference.sequences, reference.prompt_len
    device = next(model.parameters()).device
    per_prompt, first = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for seq in seqs:
            logits = model(seq[None, :-1].to(device)).logits[0, p - 1:]
            match = (logits.argmax(-1).cpu() == seq[p:])
            per_prompt.append(float(match.float().mean()))
            misses = (~match).nonzero()
            first.append(int(misses[0]) if len(misses) else len(match))
    protocol = dict(reference.protocol)
    protocol.update({"kind": "greedy", "metric": "greedy_agreement", "greedy_agreement": "fraction of the FP "
                     "model's greedy tokens the model's argmax repeats, teacher-forced on the FP continuation",
                     "dtype": model_dtype(model), "device": str(model_device(model)), "seed": None,
                     "versions": library_versions()})
    return EvalResult(value=sum(per_prompt) / len(per_prompt), metric="greedy_agreement", protocol=protocol,
                      extra={"first_divergence": sum(first) / len(first), "seconds": round(time.perf_counter() - start, 3),
                             "example_scores": {"greedy_agreement": per_prompt}})
