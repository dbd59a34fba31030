"""Statistics of the K/V an attention module caches, gathered while calibration runs the model."""
from __future__ import annotations

import torch

from harness.kv.attention import stash_rope
from harness.kv.rope import unrope


class KVRanges:
    """Per-channel min and max of the cached K and V over every calibration token, channels flattened over
    the KV heads ([kv_heads * head_dim]); keys before RoPE when `pre_rope_keys`. Needs the KV attention
    wrapper installed (harness.quant.install_kv_quant), which calls `kv_observer`. A `with` block."""

    def __init__(self, attn, pre_rope_keys: bool):
        self.attn, self.pre_rope = attn, pre_rope_keys
        self.min: dict[str, torch.Tensor] = {}
        self.max: dict[str, torch.Tensor] = {}

    def __enter__(self) -> KVRanges:
        if self.pre_rope:
            stash_rope(self.attn)
        self.attn.kv_observer = self._observe
        return self

    def __exit__(self, *exc) -> None:
        self.attn.kv_observer = None

    def _observe(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.pre_rope:
            key = unrope(key, *module.kv_rope)
        for role, x in (("key", key), ("value", value)):
            flat = x.detach().transpose(1, 2).reshape(-1, x.shape[1] * x.shape[-1]).float()
            lo, hi = flat.amin(0), flat.amax(0)
            self.min[role] = lo if role not in self.min else torch.minimum(self.min[role], lo)
            self.max[role] = hi if role not in self.max else torch.maximum(self.max[role], hi)
