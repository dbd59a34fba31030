"""The KV-cache protocol: which cached K/V entries are stored quantized, when, and in which format.

- `KVPolicy` (policy.py): formats, per-token / per-channel groups, recent window, sinks, pre-RoPE keys,
  and the storage accounting (bits per element, bytes per token);
- `policy_attention` (attention.py): a whole window evaluated as the cache would be read;
- `policy_cache` (cache.py): a real transformers cache storing exactly what the policy stores, for
  decoding and generation; the two are tested equal.
"""
from harness.kv.attention import install_kv_policy, policy_attention
from harness.kv.cache import PolicyCacheLayer, policy_cache
from harness.kv.policy import ChannelGroups, ChannelSmoothing, KVPolicy, as_format, kv_accounting

__all__ = ["ChannelGroups", "ChannelSmoothing", "KVPolicy", "PolicyCacheLayer", "as_format", "install_kv_policy", "kv_accounting", "policy_attention",
           "policy_cache"]
