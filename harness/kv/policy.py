"""A KV-cache policy: what a cache stores quantized, when, and in which format.

The KV papers differ less in their number formats than in *which* cached entries are quantized *when*:
SKVQ keeps the `window` most recent tokens and the first `sinks` tokens in full precision, WKVQuant's
past-only rule lets a token read its own K/V in full precision (window = 1), KIVI quantizes keys per
channel over groups of tokens and keeps the not-yet-full group in full precision. A `KVPolicy` states
all of that as one rule over *quantization units*:

    a unit (one token's head vector for `per_token`, a group of `group_size` tokens of one channel for
    `per_channel`) is stored quantized once its last token is older than the `window` most recent
    tokens, and never changes after; the first `sinks` tokens are never quantized.

The rule depends only on the positions of a query and a key, so a window evaluated at once
(harness.kv.attention) equals the same window decoded token by token with a cache that stores exactly
this (harness.kv.cache); tests check the two agree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import InvalidValueError, UnknownNameError
from harness.formats import Format, get_format, quantize

GRANULARITIES = ("per_token", "per_channel")
ROLES = ("key", "value")
#: Bits of the metadata stored per quantization group, by the format's scale type (scale and, for
#: asymmetric INT, the zero point, each stored in 16 bits as KIVI / SKVQ do; E8M0 / E4M3 block scales 8).
_SCALE_BITS = {"fp32": 16, "e8m0": 8, "e4m3": 8}
FP_BITS = 16


@dataclass(frozen=True)
class KVPolicy:
    """Formats and storage rule of the K and V cache (see the module docstring).

    key / value: harness formats (None: that tensor stays full precision); groups run along head_dim
        for `per_token`, along tokens (groups of the format's group_size) for `per_channel`.
    window: the most recent tokens kept in full precision (0: the current token too is read quantized,
        as a fake-quantized prefill does; 1: past-only quantization, WKVQuant).
    sinks: the first tokens kept in full precision (attention sinks, SKVQ).
    pre_rope_keys: keys are quantized before RoPE (SKVQ, KIVI) and rotated after dequantization.
    compressed: roles the attention module's codec (`kv_codecs`) stores in its own form even without a
        format (CSKV's low-rank channel shrinking; with a format the codec also quantizes what it keeps).
    """

    key: Format | None = None
    value: Format | None = None
    key_granularity: str = "per_token"
    value_granularity: str = "per_token"
    window: int = 0
    sinks: int = 0
    pre_rope_keys: bool = False
    compressed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "compressed", tuple(self.compressed))
        for role in self.compressed:
            if role not in ROLES:
                raise InvalidValueError("kv compressed role", role, ", ".join(ROLES))
        for role in ROLES:
            fmt, gran = getattr(self, role), getattr(self, f"{role}_granularity")
            if gran not in GRANULARITIES:
                raise InvalidValueError(f"kv {role}_granularity", gran, ", ".join(GRANULARITIES))
            if role in self.compressed and gran != "per_token":
                raise InvalidValueError(f"kv {role}_granularity of a compressed role", gran,
                                        "per_token (a codec stores each token's vector)")
            if fmt is None:
                continue
            # a scale over the whole tensor or sequence would let future tokens change past entries
            if fmt.granularity == "tensor" or fmt.scale_type == "e4m3":
                raise InvalidValueError(f"kv {role} format", fmt.name,
                                        "a per-row or per-group format without a per-tensor scale (a cache "
                                        "cannot know future tokens)")
            if gran == "per_channel" and fmt.granularity != "group":
                raise InvalidValueError(f"kv {role} format for per_channel", fmt.name,
                                        "a group format (groups of group_size tokens per channel), e.g. int2_asym_g32")
        for name in ("window", "sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidValueError(f"kv {name}", value, "an integer >= 0")

    # ---- which entries are stored quantized -------------------------------------------------
    @property
    def quantizes(self) -> bool:
        return any(self.stores(role) for role in ROLES)

    def stores(self, role: str) -> bool:
        """True when old entries of this role are stored transformed (quantized and / or compressed)."""
        return getattr(self, role) is not None or role in self.compressed

    def position_free(self, role: str) -> bool:
        """True when whether an entry is read quantized does not depend on the query: every entry a
        query can see (key position <= query position) is then quantized or full precision by its
        own position alone, and the window evaluation needs no mixed attention."""
        return self.window == 0 and getattr(self, f"{role}_granularity") == "per_token"

    def _unit_end(self, role: str, pos: torch.Tensor) -> torch.Tensor:
        """The last position of the quantization unit holding each position (units start after the sinks)."""
        if getattr(self, f"{role}_granularity") == "per_token":
            return pos
        g = getattr(self, role).group_size
        return self.sinks + ((pos - self.sinks).div(g, rounding_mode="floor") + 1) * g - 1

    def read_quantized(self, role: str, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """[queries, keys] bool: the cache entry at key_pos is stored quantized when query_pos is decoded."""
        if not self.stores(role):
            return torch.zeros(len(query_pos), len(key_pos), dtype=torch.bool, device=key_pos.device)
        end = self._unit_end(role, key_pos)
        return (key_pos >= self.sinks)[None, :] & (end[None, :] <= (query_pos[:, None] - self.window))

    # ---- the quantized values ----------------------------------------------------------------
    def quantize(self, role: str, x: torch.Tensor, start: int = 0, codec=None) -> torch.Tensor:
        """Every complete unit of x [batch, heads, tokens, head_dim] (tokens at positions start, start+1, ...)
        fake-quantized as the cache would store it; entries in no complete unit (sinks, a partial group)
        are returned unchanged. `codec`: a method's per-token quantizer (`codec.quantize(x, fmt)`: SKVQ's
        channel clusters, WKVQuant's channel smoothing, CSKV's low-rank features with fmt None or a format)
        instead of the format's groups along head_dim. Under autograd the rounding is straight-through
        (methods that learn through the cache)."""
        fmt = getattr(self, role)
        if not self.stores(role):
            return x
        if getattr(self, f"{role}_granularity") == "per_token":
            if codec is not None:
                return codec.quantize(x, fmt)
            if fmt is None:
                raise RuntimeError(f"the kv policy stores {role}s compressed but the attention module has no "
                                   f"{role} codec (kv_codecs): install the method that compresses them")
            q = quantize(x.detach(), fmt)
            return x + (q - x).detach() if x.requires_grad else q
        g = fmt.group_size
        first = max(self.sinks, start)
        first += (-(first - self.sinks)) % g  # the first unit boundary at or after `start`
        n = (start + x.shape[-2] - first) // g * g
        if n <= 0:
            return x
        lo = first - start
        out = x.clone()
        block = x[..., lo:lo + n, :].transpose(-1, -2)  # channels as rows, tokens as the grouped dim
        out[..., lo:lo + n, :] = quantize(block.contiguous(), fmt).transpose(-1, -2)
        return out

    # ---- records --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key.to_dict() if self.key else None,
                "value": self.value.to_dict() if self.value else None,
                "key_granularity": self.key_granularity, "value_granularity": self.value_granularity,
                "window": self.window, "sinks": self.sinks, "pre_rope_keys": self.pre_rope_keys,
                "compressed": list(self.compressed)}

    def with_(self, **overrides) -> KVPolicy:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVPolicy:
        """{key, value, key_granularity, value_granularity, window, sinks, pre_rope_keys}; `format` sets
        key and value at once; formats as names or {format: NAME, field: value} mappings."""
        fields = [f.name for f in dataclasses.fields(cls)]
        data = dict(data)
        if "format" in data:
            both = data.pop("format")
            data.setdefault("key", both)
            data.setdefault("value", both)
        for name in data:
            if name not in fields:
                raise UnknownNameError("kv policy key", name, [*fields, "format"])
        for role in ("key", "value"):
            data[role] = as_format(data.get(role), f"kv {role}")
        if "pre_rope_keys" in data and not isinstance(data["pre_rope_keys"], bool):
            raise InvalidValueError("kv pre_rope_keys", data["pre_rope_keys"], "true or false")
        if not isinstance(data.get("compressed", ()), (list, tuple)):
            raise InvalidValueError("kv compressed", data["compressed"], "a list of roles: key, value")
        return cls(**data)

    # ---- storage accounting ---------------------------------------------------------------------
    def bits_per_element(self, role: str, context: int, head_dim: int, codec=None) -> float:
        """Average stored bits per K (or V) element over a `context`-token cache, metadata and the
        full-precision tokens (sinks, window, an incomplete group) included. A codec with `stored_bits(fmt,
        head_dim)` says what one transformed entry costs per original element (CSKV: its kept fraction)."""
        fmt = getattr(self, role)
        if not self.stores(role):
            return float(FP_BITS)
        if codec is not None and hasattr(codec, "stored_bits"):
            per_entry = codec.stored_bits(fmt, head_dim)
        elif fmt is None:
            raise InvalidValueError(f"codec for compressed {role}s", type(codec).__name__,
                                    "a codec with stored_bits(fmt, head_dim)")
        else:
            per_entry = stored_bits(fmt, head_dim)
        pos = torch.arange(context)
        stored_q = int(self.read_quantized(role, torch.tensor([context - 1]), pos).sum())
        return (stored_q * per_entry + (context - stored_q) * FP_BITS) / context


def stored_bits(fmt: Format, head_dim: int) -> float:
    """Bits per quantized K/V element: the element and its share of the group's scale (and zero point);
    a per-row format has one group per head vector."""
    group = {"group": fmt.group_size, "row": head_dim}.get(fmt.granularity)
    meta = _SCALE_BITS[fmt.scale_type] * (1 if fmt.symmetric else 2)
    return fmt.bits + (meta / group if group else 0.0)


@dataclass(frozen=True)
class ChannelGroups:
    """Per-token quantization groups over the channels of all KV heads (flattened heads × head_dim):
    channels `order[bounds[i]:bounds[i+1]]` share a scale (SKVQ's clusters of similar-range channels,
    of varying sizes). The format's own grouping is replaced by one group per cluster."""

    order: torch.Tensor  # a permutation of the kv_heads * head_dim channels
    bounds: tuple[int, ...]  # cluster boundaries in `order`, 0 first, the channel count last

    def quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        """x [batch, kv_heads, tokens, head_dim], each token's cluster quantized as one group."""
        b, h, t, d = x.shape
        flat = x.transpose(1, 2).reshape(b, t, h * d)[..., self.order]
        row = fmt.with_(granularity="row", group_size=None)
        out = torch.cat([quantize(flat[..., lo:hi], row) for lo, hi in zip(self.bounds[:-1], self.bounds[1:])], dim=-1)
        restored = torch.empty_like(out)
        restored[..., self.order] = out
        return restored.reshape(b, t, h, d).transpose(1, 2)


@dataclass(frozen=True)
class ChannelSmoothing:
    """Static per-channel smoothing before dynamic per-token quantization (WKVQuant's two-dimensional
    quantization): x ↦ s · Q((x − δ) / s) + δ per channel of all KV heads (flattened heads × head_dim).
    δ = 0, s = 1 is the plain format. Under autograd the quantizer is `learnable_fake_quant` (gradients
    for δ and s through the group's scale and zero point, straight-through rounding)."""

    shift: torch.Tensor  # [kv_heads * head_dim]
    scale: torch.Tensor  # [kv_heads * head_dim], > 0

    def quantize(self, x: torch.Tensor, fmt: Format) -> torch.Tensor:
        b, h, t, d = x.shape
        shift, scale = self.shift.reshape(h, 1, d).to(x.dtype), self.scale.reshape(h, 1, d).to(x.dtype)
        y = (x - shift) / scale
        trains = y.requires_grad
        q = learnable_fake_quant(y, fmt) if trains else quantize(y, fmt)
        return q * scale + shift


def learnable_fake_quant(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Asymmetric INT fake quantization along the last dim (per row or group), differentiable in the input
    range (OmniQuant's convention: scale = (max − min) / levels, zero = round(−min / scale), rounding
    straight-through); equal in value to harness.formats.quantize up to fp32 rounding."""
    if fmt.element != "int" or fmt.symmetric or fmt.granularity not in ("row", "group"):
        raise InvalidValueError("format for learned KV smoothing", fmt.name, "an asymmetric INT per-row or group format")
    shape = y.shape
    g = y.reshape(*shape[:-1], -1, fmt.group_size) if fmt.granularity == "group" else y.unsqueeze(-2)
    hi = g.amax(-1, keepdim=True).clamp_min(0) * fmt.clip_ratio
    lo = g.amin(-1, keepdim=True).clamp_max(0) * fmt.clip_ratio
    step = ((hi - lo) / fmt.levels).clamp_min(1e-8)
    zero = _round_ste(-lo / step)
    q = torch.clamp(_round_ste(g / step) + zero, 0, fmt.levels)
    return ((q - zero) * step).reshape(shape)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def as_format(value: Any, role: str) -> Format | None:
    if value is None or isinstance(value, Format):
        return value
    if isinstance(value, str):
        return get_format(value)
    if isinstance(value, dict):
        spec = dict(value)
        if "format" not in spec:
            raise InvalidValueError(f"{role} format", value, "a format name or {format: NAME, field: value}")
        return get_format(spec.pop("format"), **spec)
    raise InvalidValueError(f"{role} format", value, "a format name, a {format: ...} mapping, or null")


def kv_accounting(policy: KVPolicy | Format | None, config: Any, context: int,
                  codecs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a `context`-token cache costs at a model's geometry: bits per stored K / V element (scales,
    zero points and full-precision tokens included), bytes per token over all layers, and the
    compression against a 16-bit cache. A plain format quantizes every entry (per-tensor scales are
    counted as free). `codecs`: each layer's `kv_codecs` (bits are averaged over the layers)."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if isinstance(policy, Format):
        k_bits = v_bits = stored_bits(policy, head_dim)
    else:
        policy = policy or KVPolicy()
        per_layer = codecs or [{}]
        k_bits, v_bits = (sum(policy.bits_per_element(role, context, head_dim, (layer or {}).get(role))
                              for layer in per_layer) / len(per_layer) for role in ROLES)
    per_token_bits = layers * kv_heads * head_dim * (k_bits + v_bits)
    return {"context": context, "key_bits": round(k_bits, 4), "value_bits": round(v_bits, 4),
            "bits_per_element": round((k_bits + v_bits) / 2, 4),
            "bytes_per_token": round(per_token_bits / 8, 1),
            "compression_vs_16bit": round(2 * FP_BITS / (k_bits + v_bits), 3)}
