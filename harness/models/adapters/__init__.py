"""Architecture adapters: one small class per model family, picked by `config.model_type`.

See `harness.models.adapters.base` for the API (LayerView, LinearGroup, Experts, WeightRef,
AttentionGeometry); methods use only that API, never model-specific attribute names.
"""
from __future__ import annotations

from torch import nn

from harness.errors import UnknownNameError
from harness.models.adapters.base import AttentionGeometry, DecoderAdapter, Experts, LayerView, LinearGroup, WeightRef
from harness.models.adapters.dense import Gemma3Adapter, LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
from harness.models.adapters.moe import MixtralAdapter, OlmoeAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter

ADAPTERS: dict[str, type[DecoderAdapter]] = {
    model_type: cls
    for cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter, Qwen3MoeAdapter, Qwen2MoeAdapter,
                MixtralAdapter, OlmoeAdapter)
    for model_type in cls.model_types
}
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def supported_families() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for `model`, chosen by its config.model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnknownNameError("model architecture", model_type, ADAPTERS)
    return ADAPTERS[model_type](model)


__all__ = [
    "ADAPTERS",
    "AttentionGeometry",
    "DecoderAdapter",
    "Gemma3Adapter",
    "Experts",
    "LayerView",
    "LinearGroup",
    "MixtralAdapter",
    "LlamaAdapter",
    "MistralAdapter",
    "OlmoeAdapter",
    "Qwen2Adapter",
    "Qwen2MoeAdapter",
    "Qwen3Adapter",
    "Qwen3MoeAdapter",
    "WeightRef",
    "get_adapter",
    "supported_families",
]
