"""Mixture-of-experts families (transformers 5 fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]).

Each sparse-MoE block has a top-k router `gate` (weight [E, H], kept in full precision) and an `experts`
module; Qwen2-MoE adds a dense shared expert and its sigmoid gate. A model may mix dense and MoE layers
(Qwen-MoE `mlp_only_layers` / `decoder_sparse_step`); `layers()` tells them apart per layer.
"""
from __future__ import annotations

from harness.models.adapters.base import DecoderAdapter


class Qwen3MoeAdapter(DecoderAdapter):
    """Qwen3-MoE: Qwen3 attention (per-head QK-norm), routed experts only."""

    model_types = ("qwen3_moe",)
    qk_norm = "per_head"


class Qwen2MoeAdapter(DecoderAdapter):
    """Qwen2-MoE / Qwen1.5-MoE: q/k/v bias, routed experts plus a shared expert (a plain SwiGLU MLP
    whose output is scaled by sigmoid(shared_expert_gate(x)))."""

    model_types = ("qwen2_moe",)
    shared_expert_attr = "shared_expert"
    shared_gate_attr = "shared_expert_gate"


class MixtralAdapter(DecoderAdapter):
    """Mixtral: Mistral attention, 8 routed experts top-2 in the real model."""

    model_types = ("mixtral",)


class OlmoeAdapter(DecoderAdapter):
    """OLMoE: QK-norm over the whole q/k projection (all heads together, not per head), routed experts."""

    model_types = ("olmoe",)
    qk_norm = "full"
