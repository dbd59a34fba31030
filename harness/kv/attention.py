"""Attention that reads K/V as a `KVPolicy` cache would store them, for a whole window at once.

Query t reads key j quantized exactly when the policy's cache holds j quantized at step t
(`KVPolicy.read_quantized`), so one forward over a window gives the logits token-by-token decoding with
that cache gives (tests/unit/test_kv_policy.py checks it against harness.kv.cache). Two paths:
- position-free policies (window 0, per-token groups): an entry is quantized or not by its own
  position alone, so K and V are replaced once and the model's own attention kernel runs;
- otherwise each score and each value read picks the quantized or the full-precision entry per
  (query, key) pair, in an eager attention over chunks of queries (memory O(chunk × keys)).
"""
from __future__ import annotations

import torch

from harness.kv.policy import KVPolicy
from harness.kv.rope import rope, unrope

QUERY_CHUNK = 512


def _rope_of(module, kv_len: int):
    """cos / sin of every key position, stashed by the pre-hook (install_kv_policy) from this forward."""
    stashed = getattr(module, "kv_rope", None)
    if stashed is None or stashed[0].shape[-2] != kv_len:
        raise RuntimeError("pre-RoPE key quantization needs the RoPE of every key: evaluate whole windows, or "
                           "decode with harness.kv.cache.policy_cache (a transformers cache holds post-RoPE keys only)")
    return stashed


def policy_kv(policy: KVPolicy, module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V with every complete quantization unit quantized (what the cache stores once the unit is old)."""
    return quantize_keys(policy, module, key), quantize_values(policy, module, value)


def kv_codec(module, role: str):
    """The module's own per-token K or V quantizer (`kv_codecs`, set by a method such as SKVQ or WKVQuant), or None."""
    return (getattr(module, "kv_codecs", None) or {}).get(role)


def quantize_keys(policy: KVPolicy, module, key: torch.Tensor, start: int = 0, rope_of=None) -> torch.Tensor:
    """Keys as stored: pre-RoPE keys are un-rotated, quantized and rotated back (cos / sin of these positions
    from `rope_of`, else the module's stash of this forward)."""
    groups = kv_codec(module, "key")
    if not policy.stores("key") or not policy.pre_rope_keys:
        return policy.quantize("key", key, start, groups)
    if getattr(module, "qk_rotation", None) is not None:  # un-RoPE of rotated keys would be meaningless
        raise NotImplementedError("pre-RoPE key quantization with an online Q/K rotation (QuaRot's R3, ...): "
                                  "use pre_rope_keys: false with rotation methods")
    cos, sin = rope_of if rope_of is not None else _rope_of(module, key.shape[-2])
    return rope(policy.quantize("key", unrope(key, cos, sin), start, groups), cos, sin).to(key.dtype)


def quantize_values(policy: KVPolicy, module, value: torch.Tensor, start: int = 0) -> torch.Tensor:
    return policy.quantize("value", value, start, kv_codec(module, "value"))


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def policy_attention(inner_fn, module, query, key, value, attention_mask, **kwargs):
    """The attention interface of transformers: Q/K/V [batch, heads, tokens, head_dim] after RoPE."""
    policy: KVPolicy = module.kv_policy
    q_len, kv_len = query.shape[-2], key.shape[-2]
    key_pos = torch.arange(kv_len, device=key.device)
    query_pos = key_pos[kv_len - q_len:]  # with a cache the queries are the newest tokens
    key_q, value_q = policy_kv(policy, module, key, value)
    mk = policy.read_quantized("key", query_pos, key_pos)
    mv = policy.read_quantized("value", query_pos, key_pos)
    if policy.position_free("key") and policy.position_free("value"):
        # the entries a query can see (j <= t) are quantized by position alone: the last row says which
        key = torch.where(mk[-1][:, None], key_q, key)
        value = torch.where(mv[-1][:, None], value_q, value)
        return inner_fn(module, query, key, value, attention_mask, **kwargs)
    if getattr(module, "attention_kernel", None) is not None:
        raise NotImplementedError(f"attention kernel {module.attention_kernel} with a windowed or per-channel KV "
                                  "policy (each query reads a different cache): use a position-free KV policy")
    return _mixed_attention(module, query, (key, key_q), (value, value_q), mk, mv, query_pos, key_pos,
                            attention_mask, kwargs)


def _mixed_attention(module, query, keys, values, mk, mv, query_pos, key_pos, attention_mask, kwargs):
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping with a windowed KV policy")
    n_rep = query.shape[1] // keys[0].shape[1]
    k_fp, k_q = (_repeat(k, n_rep) for k in keys)
    v_fp, v_q = (_repeat(v, n_rep) for v in values)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key_pos.numel()]
    out = []
    for lo in range(0, query.shape[-2], QUERY_CHUNK):
        hi = min(lo + QUERY_CHUNK, query.shape[-2])
        q = query[..., lo:hi, :]
        scores = torch.where(mk[lo:hi], q @ k_q.transpose(-1, -2), q @ k_fp.transpose(-1, -2)) * scaling
        if attention_mask is None:
            scores = scores.masked_fill(key_pos[None, :] > query_pos[lo:hi, None], float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., lo:hi, :], float("-inf"))
        else:
            scores = scores + attention_mask[..., lo:hi, :]
        # at least fp32, as transformers' eager attention (float64 stays float64: the tests compare exactly)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
        read_q = mv[lo:hi].to(probs.dtype)
        out.append((probs * read_q) @ v_q + (probs * (1 - read_q)) @ v_fp)
    return torch.cat(out, dim=-2).transpose(1, 2).contiguous(), None


def _stash_rope(module, args, kwargs):
    module.kv_rope = kwargs.get("position_embeddings")


def stash_rope(attn) -> None:
    """Keep each forward's RoPE (cos, sin) on the attention module as `kv_rope` (idempotent)."""
    if getattr(attn, "kv_rope_hook", None) is None:
        attn.kv_rope_hook = attn.register_forward_pre_hook(_stash_rope, with_kwargs=True)


def install_kv_policy(attn_modules, policy: KVPolicy | None) -> None:
    """Give each attention module the policy (None: remove it); pre-RoPE keys also need each forward's RoPE."""
    for attn in attn_modules:
        handle = getattr(attn, "kv_rope_hook", None)
        if handle is not None:
            handle.remove()
            attn.kv_rope_hook = None
        attn.kv_policy = policy if policy is not None and policy.quantizes else None
        if attn.kv_policy is not None and policy.pre_rope_keys:
            stash_rope(attn)
