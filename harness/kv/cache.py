"""A real KV cache that stores what a `KVPolicy` says: the reference the window evaluation must equal.

Each layer keeps the entries as stored: a quantization unit is quantized (and dequantized, fake
quantization) at the step its last token leaves the full-precision window, and never changes after; the
sinks, the window and an incomplete group stay full precision. Decoding token by token through this cache
with the model's own attention is the deployment semantics; `harness.kv.attention` computes the same for a
whole window at once. Pre-RoPE keys: the layer keeps each token's cos / sin (stashed by the attention
module's pre-hook when the token arrives) to undo and redo RoPE around the quantizer.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from harness.kv.attention import quantize_keys, quantize_values, stash_rope
from harness.kv.policy import KVPolicy


class PolicyCacheLayer(DynamicLayer):
    def __init__(self, policy: KVPolicy, attn=None):
        super().__init__()
        self.policy, self.attn = policy, attn
        self.quantized_upto = {"key": 0, "value": 0}  # positions below are final (quantized or kept FP)
        self.cos = self.sin = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.policy.stores("key") and self.policy.pre_rope_keys:
            cos, sin = self.attn.kv_rope
            self.cos = cos if self.cos is None else torch.cat([self.cos, cos], dim=-2)
            self.sin = sin if self.sin is None else torch.cat([self.sin, sin], dim=-2)
        keys, values = super().update(key_states, value_states)
        self._settle("key")
        self._settle("value")
        return self.keys, self.values

    def _settle(self, role: str) -> None:
        """Quantize every unit that has left the window at the current step (the newest position)."""
        if not self.policy.stores(role):
            return
        store = self.keys if role == "key" else self.values
        now = store.shape[-2] - 1
        pos = torch.arange(store.shape[-2], device=store.device)
        due = self.policy.read_quantized(role, torch.tensor([now], device=store.device), pos)[0]
        done = self.quantized_upto[role]
        # due positions form [sinks, end) (units leave the window in order): quantize the new ones
        end = int(due.nonzero().max()) + 1 if due.any() else 0
        if end <= done:
            return
        lo = max(done, self.policy.sinks)
        block = store[..., lo:end, :]
        if role == "key":
            rope_of = (self.cos[..., lo:end, :], self.sin[..., lo:end, :]) if self.policy.pre_rope_keys else None
            store[..., lo:end, :] = quantize_keys(self.policy, self.attn, block, lo, rope_of)
        else:
            store[..., lo:end, :] = quantize_values(self.policy, self.attn, block, lo)
        self.quantized_upto[role] = end


def policy_cache(policy: KVPolicy, attn_modules) -> Cache:
    """A cache of one PolicyCacheLayer per attention module (decoder layer order). Read it with attention
    that has no policy of its own (`install_kv_policy(attn_modules, None)`), or K/V would be quantized twice;
    the modules' `kv_codecs` (SKVQ's clusters, WKVQuant's smoothing) are used."""
    if policy.stores("key") and policy.pre_rope_keys:
        for attn in attn_modules:
            stash_rope(attn)
    return Cache(layers=[PolicyCacheLayer(policy, attn) for attn in attn_modules])
