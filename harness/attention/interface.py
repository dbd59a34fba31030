"""The transformers attention interface over INT-FlashAttention (int8_flash.py): the Triton kernel on CUDA,
the torch reference elsewhere, causal and sliding-window masks only."""
from __future__ import annotations

import torch

from harness.attention.int8_flash import int8_flash_reference, visible_keys
from harness.errors import InvalidValueError


def int8_flash(q, k, v, sm_scale: float, variant: str = "full", window: int | None = None) -> torch.Tensor:
    """The Triton kernel on CUDA (int8_flash_triton.py), the torch reference elsewhere: the same arithmetic."""
    if q.is_cuda:
        from harness.attention.int8_flash_triton import int8_flash_triton

        return int8_flash_triton(q, k, v, sm_scale, variant, window)
    return int8_flash_reference(q, k, v, sm_scale, variant, window)


def _check_mask(attention_mask, t: int, window: int | None, device) -> None:
    """Only causal (+ sliding-window) masks: anything else (padding) would be silently ignored."""
    if attention_mask is None:
        return
    mask = attention_mask[..., :t, :t]
    visible = mask if mask.dtype == torch.bool else mask > -1e30
    pos = torch.arange(t, device=device)
    if not torch.equal(visible.expand(visible.shape[0], 1, t, t)[:, 0],
                       visible_keys(pos, pos, t, window).expand(visible.shape[0], t, t)):
        raise InvalidValueError("attention mask for int8 flash attention", "padding or a custom mask",
                                "causal (and sliding-window) masks only")


def int8_flash_attention(module, query, key, value, attention_mask, variant: str = "full", **kwargs):
    """The transformers attention interface over int8_flash: Q/K/V [B, heads, T, D] after RoPE, no cache."""
    if query.shape[-2] != key.shape[-2]:
        raise InvalidValueError("int8 flash attention query length", query.shape[-2],
                                f"the key length {key.shape[-2]} (a prefill or a whole window; no KV cache)")
    if kwargs.get("softcap") is not None:
        raise InvalidValueError("int8 flash attention softcap", kwargs["softcap"], "None")
    window = kwargs.get("sliding_window")
    _check_mask(attention_mask, query.shape[-2], window, query.device)
    n_rep = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x for x in (key, value))
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    out = int8_flash(query, key, value, scaling, variant, window)
    return out.transpose(1, 2).contiguous(), None
