"""Quantized execution: linears, fused MoE experts and the KV cache, all fake-quantized.

Fake quantization = quantize then dequantize (harness.formats.quantize), so every op still runs in the
model's float dtype; what changes is the set of values the weights, activations and K/V can take.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from harness.attention import KERNELS
from harness.formats import Format, get_format, quantize
from harness.kv import KVPolicy, install_kv_policy, policy_attention
from harness.quant.quantizer import InputCache, Quantizer


class ActQuantized:
    """A module whose inputs go through `self.act_quantizer`; `act_format` reads and sets its format."""

    act_quantizer: Quantizer

    @property
    def act_format(self) -> Format | None:
        return self.act_quantizer.fmt

    @act_format.setter
    def act_format(self, fmt: Format | None) -> None:
        self.act_quantizer.fmt = fmt


class QuantLinear(ActQuantized, nn.Module):
    """x -> online transform (optional) -> activation fake-quant (optional) -> x Ŵᵀ + b.

    The wrapped nn.Linear holds the weight actually used: apply_scheme fake-quantizes it once, in place
    (stored dequantized, so the forward is one plain F.linear). `fp_weight` keeps the full-precision
    weight when asked for (apply_scheme(keep_fp_weights=True)), for methods that need both.
    Activations are quantized along the last dim (per token / per block of a token), in the input's dtype.
    """

    def __init__(self, linear: nn.Linear, act_format: Format | None = None, input_transform: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        self.act_quantizer = Quantizer(act_format, cache=InputCache())
        self.input_transform = input_transform
        self.weight_format: Format | None = None  # set when the weight was fake-quantized
        # non-persistent buffer: follows .to(device), stays out of state_dict
        self.register_buffer("fp_weight", None, persistent=False)

    def share_input_cache(self, other: QuantLinear) -> None:
        """Read the same tensor as `other` (q/k/v, gate/up): quantize it once for both."""
        self.act_quantizer.cache = other.act_quantizer.cache

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def keep_fp_weight(self) -> None:
        """Keep a copy of the current (full-precision) weight in `fp_weight` before it is quantized."""
        if self.fp_weight is None:
            self.fp_weight = self.linear.weight.detach().clone()

    @torch.no_grad()
    def quantize_weight(self, fmt: Format | str, rounding=None) -> None:
        """Fake-quantize the weight in place along its input dim (RTN)."""
        self.linear.weight.copy_((rounding or quantize)(self.linear.weight.data, fmt))
        self.weight_format = get_format(fmt)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        return self.act_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.linear.weight, self.linear.bias)

    def extra_repr(self) -> str:
        act = self.act_format.name if self.act_format else "fp"
        w = self.weight_format.name if self.weight_format else "as stored"
        return f"weight={w}, act={act}, transform={self.input_transform is not None}"


class QuantExperts(ActQuantized, nn.Module):
    """Replacement for a transformers-5 fused experts module that also quantizes expert activations.

    Same routing arithmetic as transformers' eager loop (per expert: gate/up, act, down, weight by the
    router probability, scatter-add); the input to gate_up (once per token, it is the same for every
    expert) and each expert's input to down are fake-quantized with `act_format`. `input_transform` and
    `down_transform` are optional online transforms before gate_up and down (e.g. Hadamards), matched by
    weights rotated offline. The fused parameters are the original module's (not copies).
    """

    def __init__(self, experts: nn.Module, act_format: Format | None = None, down_transform: nn.Module | None = None,
                 input_transform: nn.Module | None = None):
        super().__init__()
        self.input_transform = input_transform
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn
        self.num_experts = experts.gate_up_proj.shape[0]
        self.act_quantizer = Quantizer(act_format)
        self.down_transform = down_transform
        self.weight_format: Format | None = None
        self.register_buffer("fp_gate_up", None, persistent=False)
        self.register_buffer("fp_down", None, persistent=False)

    def keep_fp_weight(self) -> None:
        if self.fp_gate_up is None:
            self.fp_gate_up = self.gate_up_proj.detach().clone()
            self.fp_down = self.down_proj.detach().clone()

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_quantizer(x)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        x = hidden_states if self.input_transform is None else self.input_transform(hidden_states)
        x = self._q(x)
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.num_experts:  # expert-parallel sentinel: not on this rank
                continue
            # slot-major order, as transformers' eager loop: same rows in the same order, same bits
            slot, token = torch.where((top_k_index == expert).T)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            if self.down_transform is not None:
                h = self.down_transform(h)
            y = F.linear(self._q(h), self.down_proj[expert]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        act = self.act_format.name if self.act_format else "fp"
        return f"experts={self.num_experts}, act={act}"


def quantize_experts_weights(experts: nn.Module, fmt: Format | str, rounding=None) -> None:
    """Fake-quantize every expert's gate_up and down slice in place (along the input dim)."""
    with torch.no_grad():
        rounding = rounding or quantize
        experts.gate_up_proj.copy_(rounding(experts.gate_up_proj.data, fmt))
        experts.down_proj.copy_(rounding(experts.down_proj.data, fmt))


# ---- KV cache ---------------------------------------------------------------------------------
# The attention modules of transformers 5 call `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`
# with Q, K, V after RoPE (and, when generating, K/V already concatenated with the cache). We register
# one wrapper per inner implementation and point the model at it: every forward (prefill included)
# goes through it. The mask interface gets the inner implementation's mask builder under the same
# name, otherwise transformers would build no mask at all for an unknown name (padding ignored).
KV_PREFIX = "ptqbench_kv_"


def kv_attention_name(inner: str) -> str:
    return f"{KV_PREFIX}{inner}"


def _make_kv_attention(inner: str):
    def kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
        """K (after RoPE) and V fake-quantized per head along head_dim, or as the module's KV policy
        stores them (harness.kv); Q/K optionally rotated first."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        rotation = getattr(module, "qk_rotation", None)
        if rotation is not None:  # R3: (q R)(k R)ᵀ = q kᵀ for orthogonal R, so only the quantized K sees it
            query, key = rotation(query), rotation(key)
        observer = getattr(module, "kv_observer", None)
        if observer is not None:  # calibration of KV methods: K/V as the cache would receive them
            observer(module, query, key, value)
        inner_fn = ALL_ATTENTION_FUNCTIONS[inner]
        kernel = getattr(module, "attention_kernel", None)
        if kernel is not None:  # a scheme's attention kernel (INT8 FlashAttention, ...) replaces the inner one
            fn, fixed = KERNELS[kernel]
            inner_fn = functools.partial(fn, **fixed)
        if getattr(module, "kv_policy", None) is not None:
            return policy_attention(inner_fn, module, query, key, value, attention_mask, **kwargs)
        quantizer = getattr(module, "kv_quantizer", None)
        if quantizer is not None and quantizer.fmt is not None:
            # [batch, kv_heads, tokens, head_dim]: groups never cross heads or tokens
            key, value = quantizer(key), quantizer(value)
        return inner_fn(module, query, key, value, attention_mask, **kwargs)

    return kv_quant_attention


def _register_kv_attention(inner: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = kv_attention_name(inner)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_kv_attention(inner))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping and inner in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[inner])
    return name


def set_kv_format(attn: nn.Module, fmt: Format | None) -> None:
    """The format K and V are fake-quantized to in this attention module (None: full precision)."""
    quantizer = getattr(attn, "kv_quantizer", None)
    if quantizer is None:
        attn.kv_quantizer = Quantizer(fmt)
    else:
        quantizer.fmt = fmt


def kv_format(attn: nn.Module) -> Format | KVPolicy | None:
    """What K/V of this attention module are quantized to: a format, a KV policy, or None."""
    policy = getattr(attn, "kv_policy", None)
    if policy is not None:
        return policy
    quantizer = getattr(attn, "kv_quantizer", None)
    return quantizer.fmt if quantizer is not None else None


def kv_quant_installed(model: nn.Module) -> bool:
    return str(getattr(model.config, "_attn_implementation", "")).startswith(KV_PREFIX)


def install_kv_quant(model: nn.Module, attn_modules: list[nn.Module], kv_format: Format | KVPolicy | None,
                     qk_rotation: nn.Module | None = None) -> None:
    """Route every attention through the KV-quantizing wrapper (prefill included, no cache needed).

    Sets `kv_format` (None: K/V untouched; a KVPolicy: windows, sinks, per-channel groups, pre-RoPE keys)
    and, when given, the online Q/K rotation `qk_rotation` on each attention module; with both off the
    outputs are bit-identical to the plain model.
    """
    current = model.config._attn_implementation or "sdpa"
    inner = current[len(KV_PREFIX):] if current.startswith(KV_PREFIX) else current
    name = _register_kv_attention(inner)
    policy = kv_format if isinstance(kv_format, KVPolicy) else None
    install_kv_policy(attn_modules, policy)
    for attn in attn_modules:
        set_kv_format(attn, None if policy is not None else kv_format)
        if qk_rotation is not None:
            attn.qk_rotation = qk_rotation
    if current != name:
        model.set_attn_implementation(name)
