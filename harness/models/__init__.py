"""Models: loading (aliases, hub ids, local dirs, GGUF), architecture adapters, tiny test models."""
from harness.models.adapters import (
    ADAPTERS,
    AttentionGeometry,
    DecoderAdapter,
    Experts,
    LayerView,
    LinearGroup,
    WeightRef,
    get_adapter,
    supported_families,
)
from harness.models.loading import (
    ModelInfo,
    ModelLoadError,
    file_sha256,
    gguf_cache_root,
    load_model,
    model_fingerprint,
    model_info,
    resolve,
)
from harness.models.registry import ALIASES, describe_models, list_models
from harness.models.tiny import list_tiny_families, make_tiny_model

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "AttentionGeometry",
    "DecoderAdapter",
    "Experts",
    "LayerView",
    "LinearGroup",
    "ModelInfo",
    "ModelLoadError",
    "WeightRef",
    "describe_models",
    "file_sha256",
    "get_adapter",
    "gguf_cache_root",
    "list_models",
    "list_tiny_families",
    "load_model",
    "make_tiny_model",
    "model_fingerprint",
    "model_info",
    "resolve",
    "supported_families",
]
