"""Dense decoder families. They share the Llama layout; what differs is recorded as class attributes."""
from __future__ import annotations

from harness.models.adapters.base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    """Llama 2/3, SmolLM2: RMSNorm -> q, k, v (no bias) -> RoPE; SwiGLU MLP."""

    model_types = ("llama",)


class MistralAdapter(DecoderAdapter):
    """Mistral: the Llama layout with an optional sliding window (in `attention.sliding_window`)."""

    model_types = ("mistral",)


class Qwen2Adapter(DecoderAdapter):
    """Qwen2 / Qwen2.5: the Llama layout with biases on q, k, v (rotations must carry them along)."""

    model_types = ("qwen2",)


class Qwen3Adapter(DecoderAdapter):
    """Qwen3: no q/k/v bias; RMSNorm over head_dim on every Q and K head (`q_norm`, `k_norm`) before RoPE,
    so a rotation of Q/K heads can only be applied after it (online, R3)."""

    model_types = ("qwen3",)
    qk_norm = "per_head"
