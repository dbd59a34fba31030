"""Windowing and a memory-lean forward pass shared by perplexity and KL.

The logits of a batch of windows are never held as one fp32 [B, T, V] tensor: for the common
decoder-only families we run the decoder body once, then apply the LM head to chunks of positions
and upcast each chunk to fp32 (SmolLM2's vocabulary is 49152, so one 2048-token window alone is
400 MB of fp32 logits). Other models fall back to `model(ids).logits`, upcast chunk by chunk.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from harness.errors import InvalidValueError
from harness.eval.result import NonFiniteError, model_device

#: Families whose CausalLM forward is exactly `lm_head(decoder(ids).last_hidden_state)`.
HEAD_SPLIT_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral",
                                 "phi3", "olmo2", "gemma", "gemma3_text"})
#: Config fields that change logits after the head; a model that sets one takes the plain path.
_LOGIT_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
#: fp32 elements per logits chunk (64 MiB on CPU, 256 MiB on GPUs, where small matmuls waste time):
#: bounds memory independently of batch size and seqlen.
CHUNK_ELEMENTS = 1 << 24
CHUNK_ELEMENTS_GPU = 1 << 26


def make_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                 protocol_cap: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Non-overlapping windows [W, seqlen] from a 1-D token tensor; the remainder is dropped.

    `max_windows` keeps the first N windows; `protocol_cap` is a cap the dataset's protocol imposes
    (GPTQ's 256 windows for C4). Returns the windows and a dict describing the cut.
    """
    if seqlen < 2:
        raise InvalidValueError("seqlen", seqlen, "an integer >= 2")
    if max_windows is not None and max_windows < 1:
        raise InvalidValueError("max_windows", max_windows, "a positive integer or None")
    available = ids.numel() // seqlen
    if available == 0:
        raise InvalidValueError("seqlen", seqlen, f"at most the text length ({ids.numel()} tokens)")
    n = available
    if protocol_cap is not None:
        n = min(n, protocol_cap)
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * seqlen].view(n, seqlen)
    info = {"seqlen": seqlen, "windows": n, "windows_available": available, "max_windows": max_windows,
            "protocol_window_cap": protocol_cap, "tokens_text": int(ids.numel()),
            "tokens_remainder_dropped": int(ids.numel() - available * seqlen), "tokens_evaluated": n * seqlen,
            "tokens_predicted": n * (seqlen - 1)}
    return windows, info


def window_bos_id(model: Any, tokenizer: Any) -> int | None:
    """The BOS id evaluation windows start with when the model's adapter asks for one (Gemma), else None."""
    from harness.models.adapters import ADAPTERS

    cls = ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    return getattr(tokenizer, "bos_token_id", None) if cls is not None and cls.window_bos else None


def _split_model(model: Any):
    """(decoder body, lm head) when logits == head(body(ids)) for this model, else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in HEAD_SPLIT_FAMILIES:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_MODIFIERS):
        return None
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(body, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    return body, head


def logit_chunks(model: Any, input_ids: torch.Tensor, chunk_elements: int | None = None,
                 split_head: bool = True) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (row offset, fp32 logits [rows, V], next-token targets [rows]) for a batch [B, T].

    Rows enumerate the predicting positions t = 0..T-2 of each window, window-major (B*(T-1) rows).
    Raises NonFiniteError on NaN/Inf logits. Call under torch.inference_mode().
    """
    device = model_device(model)
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS if device.type == "cpu" else CHUNK_ELEMENTS_GPU
    ids = input_ids.to(device)
    targets = ids[:, 1:].reshape(-1)
    parts = _split_model(model) if split_head else None
    if parts is not None:
        body, head = parts
        out = body(input_ids=ids, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        # a wrapped head (e.g. a quantized linear) may hide .weight: fall back to the config's vocab size
        weight = getattr(head, "weight", None)
        vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else getattr(model.config, "vocab_size", None)
    else:
        # transformers models take use_cache (no KV cache needed); a plain nn.Module may not
        out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        head, vocab = None, logits.shape[-1]
    rows = max(1, chunk_elements // (vocab or 32768))
    for start in range(0, flat.shape[0], rows):
        block = flat[start:start + rows]
        chunk = (head(block) if head is not None else block).float()
        if not torch.isfinite(chunk).all():
            bad = int((~torch.isfinite(chunk)).sum())
            raise NonFiniteError(f"non-finite logits: {bad} NaN/Inf values in a chunk of {chunk.numel()}")
        yield start, chunk, targets[start:start + rows]
