"""Dense -> MoE architecture conversion: a dense decoder whose FFNs were carved into experts (CMoE) becomes
a standard transformers Qwen2-MoE model, so every MoE adapter, scheme and method treats it like any MoE.

The mapping (architecture knowledge, kept here):
- Llama-layout dense models (llama; qwen2 with its q/k/v biases) share Qwen2-MoE's attention, RMSNorm,
  RoPE and embeddings exactly; those tensors are moved over as they are (no copy);
- each carved FFN becomes a `Qwen2MoeSparseMoeBlock`: the routed experts in the fused layout
  (gate_up_proj [E, 2I, H], down_proj [E, H, I]), the always-active neurons as its `shared_expert`;
- Qwen2-MoE scales the shared expert by sigmoid(shared_expert_gate(x)); a carved shared expert is a plain
  part of the dense FFN (weight 1), so the gate is zero and the shared down_proj is doubled:
  sigmoid(0) x 2 = 1, exactly, in every float format (a power-of-two scale);
- the router is whatever module the caller puts in the block's `gate` slot (it must return
  (router_logits, top-k weights, top-k indices) like Qwen2-MoE's own router).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import InvalidValueError

#: dense families whose attention / norms / RoPE are Qwen2-MoE's (and whether q/k/v carry a bias)
CONVERTIBLE = {"llama": False, "qwen2": True}


@dataclass(frozen=True)
class MoEShape:
    """The MoE geometry of a carved FFN."""

    num_experts: int  # routed experts
    top_k: int  # routed experts active per token
    expert_size: int  # neurons per routed expert
    shared_size: int  # neurons of the shared expert (0: none)


def check_convertible(config) -> None:
    if config.model_type not in CONVERTIBLE:
        raise InvalidValueError("dense architecture for MoE conversion", config.model_type, sorted(CONVERTIBLE))
    if getattr(config, "mlp_bias", False):
        raise InvalidValueError("mlp_bias of the dense model", True, [False])


def moe_config(dense_config, shape: MoEShape):
    """The Qwen2-MoE config of `dense_config` with every FFN replaced by an MoE block of `shape`."""
    from transformers import Qwen2MoeConfig

    check_convertible(dense_config)
    c = dense_config
    qkv_bias = CONVERTIBLE[c.model_type] or bool(getattr(c, "attention_bias", False))
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters), use_sliding_window=False, attention_dropout=0.0,
        qkv_bias=qkv_bias, decoder_sparse_step=1, mlp_only_layers=[], num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k, moe_intermediate_size=shape.expert_size,
        shared_expert_intermediate_size=max(shape.shared_size, 1), norm_topk_prob=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    config.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    config._attn_implementation = getattr(c, "_attn_implementation", None) or "sdpa"
    return config


def standalone_config(config):
    """`config` for blocks run outside a model (a calibration step): the experts' eager loop."""
    config = copy.copy(config)
    config._experts_implementation = "eager"
    return config


def moe_block(config, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, routed: list[list[int]],
              shared: list[int], router: nn.Module) -> nn.Module:
    """A Qwen2-MoE sparse block whose experts are exact slices of a dense FFN's neurons.

    gate / up: the dense gate_proj / up_proj weights [d_ff, H]; down: down_proj [H, d_ff]; `routed`: each
    routed expert's neuron indices (equal sizes); `shared`: the shared expert's neurons."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    dtype = gate.dtype
    with torch.device("meta"):
        block = Qwen2MoeSparseMoeBlock(config)
    idx = torch.tensor(routed, dtype=torch.long)  # [E, I]
    block.experts.gate_up_proj = nn.Parameter(torch.cat([gate[idx], up[idx]], dim=1), requires_grad=False)
    block.experts.down_proj = nn.Parameter(down[:, idx].permute(1, 0, 2).contiguous(), requires_grad=False)
    s = torch.tensor(shared, dtype=torch.long)
    mlp = block.shared_expert
    if len(shared):
        mlp.gate_proj.weight = nn.Parameter(gate[s].clone(), requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(up[s].clone(), requires_grad=False)
        mlp.down_proj.weight = nn.Parameter(down[:, s] * 2, requires_grad=False)  # x sigmoid(0) = 1
    else:  # no shared neurons: one zero neuron (Qwen2-MoE always has a shared expert)
        hidden = gate.shape[1]
        mlp.gate_proj.weight = nn.Parameter(torch.zeros(1, hidden, dtype=dtype), requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(torch.zeros(1, hidden, dtype=dtype), requires_grad=False)
        mlp.down_proj.weight = nn.Parameter(torch.zeros(hidden, 1, dtype=dtype), requires_grad=False)
    block.shared_expert_gate.weight = nn.Parameter(torch.zeros(1, gate.shape[1], dtype=dtype), requires_grad=False)
    block.gate = router
    return block


def to_moe_model(dense_model: nn.Module, blocks: list[nn.Module], shape: MoEShape) -> nn.Module:
    """A Qwen2MoeForCausalLM holding `dense_model`'s attention, norms and embeddings (the same tensors) and
    `blocks[i]` as layer i's FFN. The dense model is left without its FFNs' owners: do not use it after."""
    from transformers import Qwen2MoeForCausalLM

    config = moe_config(dense_model.config, shape)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    dense_layers = dense_model.model.layers
    for i, layer in enumerate(model.model.layers):
        src = dense_layers[i]
        layer.self_attn = _moved_attention(src.self_attn, layer.self_attn)
        layer.input_layernorm.weight = src.input_layernorm.weight
        layer.post_attention_layernorm.weight = src.post_attention_layernorm.weight
        layer.mlp = blocks[i]
    model.model.embed_tokens = dense_model.model.embed_tokens
    model.model.norm.weight = dense_model.model.norm.weight
    with torch.device(dense_model.model.embed_tokens.weight.device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    for block in blocks:  # the experts' implementation (eager / grouped_mm) is the model's choice
        block.experts.config = config
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head.weight = dense_model.lm_head.weight
    model.generation_config = dense_model.generation_config
    model.eval().requires_grad_(False)
    return model


def _moved_attention(src: nn.Module, dst: nn.Module) -> nn.Module:
    """`dst` (a meta Qwen2-MoE attention) with `src`'s projection weights and biases."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        a, b = getattr(src, name), getattr(dst, name)
        b.weight = a.weight
        if b.bias is not None:
            b.bias = a.bias if a.bias is not None else nn.Parameter(torch.zeros_like(a.weight[:, 0]),
                                                                    requires_grad=False)
    return dst
