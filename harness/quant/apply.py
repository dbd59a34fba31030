"""Install a quantization scheme on a model through its adapter."""
from __future__ import annotations

import torch
from torch import nn

from harness.formats import quantize
from harness.quant.layers import QuantExperts, QuantLinear, install_kv_quant, kv_quant_installed, quantize_experts_weights
from harness.quant.scheme import QuantScheme, get_scheme


def wrap_linear(parent: nn.Module, attr: str) -> QuantLinear:
    """Replace parent.<attr> (an nn.Linear) by a QuantLinear around it (idempotent)."""
    module = getattr(parent, attr)
    if not isinstance(module, QuantLinear):
        module = QuantLinear(module)
        setattr(parent, attr, module)
    return module


def wrap_experts(layer) -> QuantExperts:
    """Replace a layer's fused experts module by a QuantExperts around the same parameters (idempotent)."""
    experts = layer.experts.module
    if not isinstance(experts, QuantExperts):
        experts = QuantExperts(experts)
        layer.experts.set_module(experts)
    return experts


def wrap_site(layer, role: str) -> QuantLinear | QuantExperts:
    """The role's module wrapped for quantized execution (idempotent): a QuantLinear around a linear
    role, a QuantExperts around the fused experts."""
    if role == "experts":
        return wrap_experts(layer)
    module = layer.site(role)
    if not isinstance(module, QuantLinear):
        module = QuantLinear(module)
        layer.replace_site(role, module)
    return module


#: readers of one input tensor: their wrappers share one activation-quantization cache
SHARED_INPUT_ROLES = (("q", "k", "v"), ("gate", "up"), ("shared_gate", "shared_up"))


def wrap_layer(layer, experts: bool = True) -> dict[str, QuantLinear | QuantExperts]:
    """Every quantizable module of a layer view wrapped (idempotent): role -> wrapper; the fused experts
    too unless `experts` is False."""
    wrapped = {role: wrap_site(layer, role) for role in layer.linear_roles()}
    for roles in SHARED_INPUT_ROLES:
        readers = [wrapped[r] for r in roles if r in wrapped]
        for reader in readers[1:]:
            reader.share_input_cache(readers[0])
    if experts and layer.experts is not None:
        wrapped["experts"] = wrap_experts(layer)
    return wrapped


@torch.no_grad()
def quantize_weight_(weight: torch.Tensor, fmt, rounding=None) -> None:
    """RTN in place along the input dim ([out, in] or fused [E, out, in])."""
    weight.copy_((rounding or quantize)(weight.data, fmt))


def apply_scheme(model: nn.Module, adapter, scheme: QuantScheme | str | dict, quantize_weights: bool = True,
                 keep_fp_weights: bool = False, weight_rounding=None) -> nn.Module:
    """Quantize `model` in place as `scheme` says, through `adapter`; returns the model.

    - every nn.Linear of every decoder layer becomes a QuantLinear with the activation format;
    - with `quantize_weights`, weights (every expert's slices included) are RTN fake-quantized in place;
      methods that set the weights themselves (GPTQ, ...) pass False;
    - fused experts are replaced by QuantExperts when activations are quantized (otherwise transformers'
      own experts kernel runs, so an identity scheme stays bit-identical);
    - K/V are quantized inside attention when the scheme has a KV format (or policy), and the scheme's
      attention kernel (e.g. INT8 FlashAttention) replaces the model's;
    - lm_head / embeddings only when the scheme says so; routers and norms never.
    `weight_rounding(w, fmt)` replaces plain RTN (e.g. `harness.gptq.clip_searched_rtn`).
    `keep_fp_weights` keeps the pre-quantization weights on the wrappers (QuantLinear.fp_weight,
    QuantExperts.fp_gate_up / fp_down). The scheme's record is left in `model.ptqbench_scheme`.
    """
    scheme = get_scheme(scheme)
    wfmt = scheme.weight if quantize_weights else None
    attn_modules = []
    for layer in adapter.layers():
        for wrapped in wrap_layer(layer, experts=False).values():
            wrapped.act_format = scheme.activation
            if keep_fp_weights:
                wrapped.keep_fp_weight()
            if wfmt is not None:
                wrapped.quantize_weight(wfmt, weight_rounding)
        if layer.experts is not None:
            experts = layer.experts.module
            if (scheme.activation is not None or keep_fp_weights) and not isinstance(experts, QuantExperts):
                experts = wrap_experts(layer)
            if isinstance(experts, QuantExperts):
                experts.act_format = scheme.activation
                if keep_fp_weights:
                    experts.keep_fp_weight()
            if wfmt is not None:
                quantize_experts_weights(experts, wfmt, weight_rounding)
                if isinstance(experts, QuantExperts):
                    experts.weight_format = wfmt
        attn_modules.append(layer.attn)
    if scheme.lm_head or scheme.embeddings:
        _quantize_head_and_embeddings(model, adapter, scheme, wfmt, keep_fp_weights, weight_rounding)
    for attn in attn_modules:  # the scheme's attention kernel (None: the model's own)
        attn.attention_kernel = scheme.attention
    if scheme.kv is not None or scheme.attention is not None or kv_quant_installed(model) or any(
            getattr(a, "qk_rotation", None) is not None for a in attn_modules):
        install_kv_quant(model, attn_modules, scheme.kv)
    model.ptqbench_scheme = scheme.to_dict()
    return model


def _quantize_head_and_embeddings(model, adapter, scheme: QuantScheme, wfmt, keep_fp_weights: bool,
                                  rounding=None) -> None:
    # tied tables must be split first, or quantizing one would silently quantize the other
    if scheme.lm_head != scheme.embeddings:
        adapter.untie_embeddings()
    if scheme.embeddings and wfmt is not None:
        quantize_weight_(adapter.embed.weight, wfmt, rounding)  # one row per token, groups along hidden
    if scheme.lm_head:
        head = wrap_linear(*adapter.lm_head_site())
        head.act_format = scheme.activation
        if keep_fp_weights:
            head.keep_fp_weight()
        if wfmt is not None and not (scheme.embeddings and adapter.tied_embeddings):
            head.quantize_weight(wfmt, rounding)
