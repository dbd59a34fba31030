"""Quantization schemes: which format (if any) for weights, activations and the KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import InvalidValueError, UnknownNameError
from harness.formats import Format
from harness.kv.policy import KVPolicy, as_format


@dataclass(frozen=True)
class QuantScheme:
    """Formats for weights (W), linear-layer inputs (A) and the KV cache; None = full precision.

    `kv` is a format (K after RoPE and V, per head and token along head_dim, every entry quantized) or a
    `harness.kv.KVPolicy` (per-channel groups, a full-precision window and sinks, pre-RoPE keys).

    Every nn.Linear of every decoder layer and every routed expert is covered by W and A. lm_head and the
    embedding table stay in full precision (as QuaRot and its successors do) unless `lm_head` /
    `embeddings` is set: then lm_head gets W and A like any linear, the embedding rows get W. MoE routers,
    norms and the attention softmax always stay in full precision. `to_dict` records all of that, so every
    number says what was and was not quantized.
    """

    name: str
    weight: Format | None = None
    activation: Format | None = None
    kv: Format | KVPolicy | None = None
    lm_head: bool = False
    embeddings: bool = False
    attention: str | None = None  # an attention kernel (harness.attention.KERNELS), e.g. int8_flash

    def __post_init__(self) -> None:
        from harness.attention import KERNELS

        if self.attention is not None and self.attention not in KERNELS:
            raise UnknownNameError("attention kernel", self.attention, KERNELS)

    @property
    def full_precision(self) -> list[str]:
        parts = [] if self.embeddings and self.weight is not None else ["embeddings"]
        parts += [] if self.lm_head and (self.weight or self.activation) else ["lm_head"]
        return parts + ["router", "norms", "attention softmax"]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "weight": self.weight.to_dict() if self.weight else None,
            "activation": self.activation.to_dict() if self.activation else None,
            "kv": self.kv.to_dict() if self.kv else None,
            "full_precision": self.full_precision,
        }
        # only when set, so that the records (and run ids) of the default schemes stay as they were
        extra = [part for part in ("lm_head", "embeddings") if part not in self.full_precision]
        if extra:
            out["also_quantized"] = extra
        if self.attention is not None:  # only when set, as above
            out["attention"] = self.attention
        return out

    @property
    def is_identity(self) -> bool:
        return self.weight is None and self.activation is None and self.kv is None and self.attention is None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantScheme:
        """{name, weight|w, activation|a, kv, lm_head, embeddings, attention}: each format a name, a
        {format: name, **overrides} mapping or null; lm_head / embeddings booleans; attention a kernel name."""
        aliases = {"w": "weight", "a": "activation", "weights": "weight", "act": "activation",
                   "activations": "activation"}
        keys = ["name", "weight", "activation", "kv", "lm_head", "embeddings", "attention"]
        fields: dict[str, Any] = {}
        for key, value in data.items():
            key = aliases.get(key, key)
            if key not in keys:
                raise UnknownNameError("scheme key", key, keys)
            if key in ("lm_head", "embeddings"):
                if not isinstance(value, bool):
                    raise InvalidValueError(f"scheme {key}", value, "true or false")
                fields[key] = value
            elif key == "name":
                fields[key] = str(value)
            elif key == "attention":
                fields[key] = None if value is None else str(value)
            elif key == "kv" and isinstance(value, dict) and _is_policy(value):
                fields[key] = KVPolicy.from_dict(value)
            else:
                fields[key] = _format(value, key)
        fields.setdefault("name", "custom")
        return cls(**fields)


def _is_policy(value: dict) -> bool:
    """A kv mapping is a policy when it names anything but one format: {key, value, window, sinks, ...}."""
    return "format" not in value or len(set(value) & {f for f in KVPolicy.__dataclass_fields__}) > 0


def _format(value: Any, role: str) -> Format | None:
    return as_format(value, role)


# name -> (weight, activation, kv); KV formats quantize along head_dim (one group per head and token)
_PRESETS: dict[str, tuple[str | None, str | None, str | None]] = {
    "w16a16": (None, None, None),
    "w8a8": ("int8", "int8", None),
    "w8a8kv8": ("int8", "int8", "int8_asym"),
    "w4a16": ("int4", None, None),
    "w4a16_g128": ("int4_g128", None, None),
    "w4a16_asym_g128": ("int4_asym_g128", None, None),
    "w3a16_g128": ("int3_g128", None, None),
    "w4a8": ("int4", "int8", None),
    "w4a4": ("int4", "int4", None),
    "w4a4kv4": ("int4", "int4", "int4_asym"),
    "w4a4kv4_asym": ("int4", "int4_asym", "int4_asym"),  # QuaRot / SpinQuant scripts: --a_asym --k_asym --v_asym
    "w6a6": ("int6", "int6", None),
    "mxfp4": ("mxfp4", "mxfp4", None),
    "mxfp4_wa": ("mxfp4", "mxfp4", None),
    "mxfp4_w": ("mxfp4", None, None),
    "mxfp4_a": (None, "mxfp4", None),
    "mxfp4_kv": ("mxfp4", "mxfp4", "mxfp4"),
    "mxfp6": ("mxfp6_e2m3", "mxfp6_e2m3", None),
    "mxfp8": ("mxfp8_e4m3", "mxfp8_e4m3", None),
    "mxint8": ("mxint8", "mxint8", None),
    "mxint4": ("mxint4", "mxint4", None),
    "nvfp4": ("nvfp4", "nvfp4", None),
    "nvfp4_w": ("nvfp4", None, None),
    "nvint4": ("nvint4", "nvint4", None),
    "fp8": ("fp8_e4m3", "fp8_e4m3", None),
}

# name -> KV policy of a KV-only scheme (weights and activations full precision): the baselines of the KV papers
_KV_PRESETS: dict[str, dict[str, Any]] = {
    # per-token asymmetric groups along head_dim, every entry quantized (a fake-quantized prefill)
    "kv8": {"format": "int8_asym"},
    "kv4": {"format": "int4_asym"},
    "kv2": {"format": "int2_asym"},
    "k4v4_g32": {"format": "int4_asym_g32"},
    "k2v2_g32": {"format": "int2_asym_g32"},
    # past-only (WKVQuant): a token reads its own K/V in full precision
    "kv4_past_only": {"format": "int4_asym", "window": 1},
    # KIVI: keys per channel over groups of 32 tokens, values per token in groups of 32 channels, the
    # incomplete key group and the 32 most recent tokens full precision (its residual length)
    "kivi2": {"key": "int2_asym_g32", "value": "int2_asym_g32", "key_granularity": "per_channel", "window": 32},
    "kivi4": {"key": "int4_asym_g32", "value": "int4_asym_g32", "key_granularity": "per_channel", "window": 32},
}


def list_schemes() -> list[str]:
    return sorted([*_PRESETS, *_KV_PRESETS])


def get_scheme(name: str | QuantScheme | dict) -> QuantScheme:
    if isinstance(name, QuantScheme):
        return name
    if isinstance(name, dict):
        return QuantScheme.from_dict(name)
    if name in _KV_PRESETS:
        return QuantScheme(name, kv=KVPolicy.from_dict(_KV_PRESETS[name]))
    if name not in _PRESETS:
        raise UnknownNameError("scheme", name, [*_PRESETS, *_KV_PRESETS])
    w, a, kv = _PRESETS[name]
    return QuantScheme(name, _format(w, "weight"), _format(a, "activation"), _format(kv, "kv"))
