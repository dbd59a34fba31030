"""Dense decoder families. They share the Llama layout; what differs is recorded as class attributes."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from harness.models.adapters.base import AttentionGeometry, DecoderAdapter, LayerView


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


class UnitOffsetRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm `x / rms(x) * (1 + w)` held as a plain-scale RMSNorm with weight `1 + w`.

    The same fp32 arithmetic as `Gemma3RMSNorm` (the sum 1 + w is rounded once either way), so an fp32
    model's outputs keep their bits (tested); in a bf16 model the stored 1 + w is rounded to bf16 (a 2^-8
    relative change of each gain). Every method then folds scales into `norm.weight` as on Llama."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.eps = norm.eps
        self.weight = torch.nn.Parameter((1.0 + norm.weight.detach().float()).to(norm.weight.dtype),
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, weight = 1 + gemma's w"


class Gemma3Adapter(DecoderAdapter):
    """Gemma-3 (text): sandwich norms, (1 + w) RMSNorms, per-head QK-norm, GeGLU, sqrt(hidden)-scaled tied
    embeddings, sliding-window and global layers.

    Each branch's output is normalised (`post_attention_layernorm`, `post_feedforward_layernorm`) before the
    residual add; the MLP reads `pre_feedforward_layernorm`. So o_proj and down_proj do not write the residual
    stream: `LayerView.branch_out_norms` lists those norms, and a residual rotation is exact only when it is
    applied after them (harness.rotation.install does so online). The (1 + w) norms are replaced on adapter
    creation by `UnitOffsetRMSNorm` (same bits), so scale folding works unchanged. Windows start with BOS."""

    model_types = ("gemma3_text",)
    qk_norm = "per_head"
    # Gemma attends to BOS as its sink: without it, 8 x 256 wikitext2 windows give ppl 140 instead of 31
    window_bos = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        _replace_modules(model, lambda m: type(m).__name__ == "Gemma3RMSNorm", UnitOffsetRMSNorm)

    @property
    def attention(self) -> AttentionGeometry:
        geometry = super().attention
        rope = dict(getattr(self.config, "rope_parameters", None) or {})
        full = rope.get("full_attention") if isinstance(rope.get("full_attention"), dict) else rope
        return dataclasses.replace(geometry, rope_theta=full.get("rope_theta"), rope_type=full.get("rope_type", "default"))

    def layer(self, index: int) -> LayerView:
        view = super().layer(index)
        layer = view.module
        view.mlp_norm = layer.pre_feedforward_layernorm
        view.branch_out_norms = [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
        view.sites.update({"mlp_norm": (layer, "pre_feedforward_layernorm"),
                           "attn_out_norm": (layer, "post_attention_layernorm"),
                           "mlp_out_norm": (layer, "post_feedforward_layernorm")})
        return view


def _replace_modules(root: nn.Module, match, make) -> None:
    """Replace every submodule for which `match(module)` holds by `make(module)` (idempotent when `make`'s
    result does not match)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
