"""Fuse a set of rotations into a model (QuaRot-style computational invariance) through its adapter.

Sites (QuaRot's names):
- R1 `residual` [d, d]: RMSNorm scales folded into the linears they feed (and lm_head), embeddings
  untied; embeddings, every residual reader (q, k, v, gate, up, router, experts' gate_up) get W Q, every
  writer (o, down, experts' down) gets Qᵀ W; offline, zero run-time cost. Where a norm sits on a
  branch's output (Gemma-3's sandwich norms) the writer stays and Q is applied online after that norm.
- R2 `head` [hd, hd]: per head, v_proj output and o_proj input; offline. `heads` (one per layer, overrides
  `head`): [hd, hd] for every head of that layer, or [kv_heads, hd, hd], one per KV head, shared by the
  query heads of its GQA group (learned R2 of SpinQuant / DartQuant).
- R3 `qk` [hd, hd]: online on Q and K after RoPE (cancels in Q Kᵀ; only the quantized K sees it).
- R4 `down`: online before down_proj (and every expert's down), inverse fused into its weight: a Hadamard of
  size d_ff, one block repeated along d_ff, one dense matrix per layer, or per layer a channel permutation
  and a block repeated along d_ff ("permuted_block": O(d_ff) state per layer, not O(d_ff²)).
- `o_heads` [heads, heads]: online on o_proj's input across heads, fused into o_proj's weight; with a
  per-head Hadamard R2 on V this makes o_proj's input see the full H_heads ⊗ H_hd (QuaRot's
  `rotate_ov_proj` + `online_partial_had`).
With every quantizer off the rotated model computes the same function (see `equivalence_error`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from harness.quant import install_kv_quant, wrap_site
from harness.rotation.fuse import (
    OnlineTransform,
    fold_norm,
    rotate_embedding,
    rotate_heads_input,
    rotate_heads_value,
    rotate_input,
    rotate_output,
)
from harness.transforms import apply_block_rotation, hadamard, hadamard_transform


@dataclass
class Rotations:
    """Which rotation goes where. `down_kind`: "hadamard" (fast transform of size d_ff), "block" (one
    block matrix repeated along d_ff), "dense" (one matrix per layer in `down`), or "permuted_block"
    (per layer, x -> x[..., down_perm[i]] then the block `down[i]` repeated along d_ff)."""

    residual: torch.Tensor | None = None
    head: torch.Tensor | None = None
    qk: torch.Tensor | None = None
    down_kind: str | None = None
    down: list[torch.Tensor] = field(default_factory=list)
    down_block: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    heads: list[torch.Tensor] = field(default_factory=list)  # per-layer R2, see the module docstring
    o_heads: torch.Tensor | None = None  # [heads, heads]: online across heads on o_proj's input (QuaRot)
    down_perm: list[torch.Tensor] = field(default_factory=list)  # per layer, "permuted_block" (int64 [d_ff])

    def as_float64(self) -> Rotations:
        """A copy with every matrix in float64 (how a calibration stores them)."""
        def f64(t):
            return None if t is None else t.detach().to(torch.float64).contiguous()

        return Rotations(f64(self.residual), f64(self.head), f64(self.qk), self.down_kind,
                         [f64(m) for m in self.down], f64(self.down_block), dict(self.info),
                         [f64(m) for m in self.heads], f64(self.o_heads), [p.detach().long() for p in self.down_perm])

    def head_of(self, index: int) -> torch.Tensor | None:
        """R2 of layer `index`: its own from `heads` when given, else the shared `head`."""
        return self.heads[index] if self.heads else self.head


def fold_norms(adapter) -> None:
    """RMSNorm scales into the following linears (the residual stream becomes rotation-invariant)."""
    adapter.untie_embeddings()
    for layer in adapter.layers():
        fold_norm(layer.attn_norm.weight, [layer.q.weight, layer.k.weight, layer.v.weight])
        readers = [lin.weight for lin in layer.mlp_in] + [m.weight for m in layer.router_linears]
        if layer.experts is not None:
            readers.append(layer.experts.gate_up)
        fold_norm(layer.mlp_norm.weight, readers)
    fold_norm(adapter.final_norm.weight, [adapter.lm_head.weight])


def rotate_residual(adapter, q: torch.Tensor) -> None:
    rotate_embedding(adapter.embed.weight, q)
    for layer in adapter.layers():
        for lin in layer.residual_readers:
            rotate_input(lin.weight, q)
        for module in layer.router_linears:
            rotate_input(module.weight, q)
        for lin in layer.residual_writers:
            rotate_output(lin.weight, q, lin.bias)
        # a norm on the branch output (Gemma) does not commute with Q: rotate after it, online (exact,
        # costs one hidden x hidden product per branch; the norm's input stays unrotated)
        for role in ("attn_out_norm", "mlp_out_norm"):
            if role in layer.sites:
                norm = layer.site(role)
                layer.replace_site(role, torch.nn.Sequential(norm, OnlineTransform(matrix=q, name="R1 after branch norm")))
        if layer.experts is not None:
            rotate_input(layer.experts.gate_up, q)
            rotate_output(layer.experts.down, q)
    rotate_input(adapter.lm_head.weight, q)


def rotate_heads(layer, r: torch.Tensor, adapter) -> None:
    """R2 on one layer: v_proj output and o_proj input per head. `r` [hd, hd] for every head, or
    [kv_heads, hd, hd]: KV head j's values get r[j], and so does the o_proj input of every query head
    that attends with KV head j (query head h uses KV head h // groups), so the product stays exact."""
    hd = adapter.head_dim
    if r.dim() == 2:
        rotate_heads_value(layer.v.weight, r, hd, layer.v.bias)
        rotate_heads_input(layer.o.weight, r, hd)
        return
    geometry = adapter.attention
    if r.shape[0] != geometry.num_kv_heads:
        from harness.errors import InvalidValueError

        raise InvalidValueError("number of per-KV-head R2 matrices", r.shape[0],
                                f"{geometry.num_kv_heads} (the model's KV heads)")
    bias = layer.v.bias
    for j in range(geometry.num_kv_heads):
        rows = slice(j * hd, (j + 1) * hd)
        rotate_heads_value(layer.v.weight[rows], r[j], hd, None if bias is None else bias[rows])
    for h in range(geometry.num_heads):
        rotate_heads_input(layer.o.weight[:, h * hd:(h + 1) * hd], r[h // geometry.kv_groups], hd)


def across_heads(matrix: torch.Tensor, head_dim: int):
    """x -> x (M ⊗ I_hd): mixes the heads of an attention output [..., heads * hd] by M [heads, heads]."""
    m = matrix.to(torch.float32)

    def apply(x: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(*x.shape[:-1], m.shape[0], head_dim)
        return torch.einsum("...hd,hg->...gd", heads, m.to(x.device)).reshape(x.shape)

    return apply


def online_fn(kind: str, matrix: torch.Tensor | None = None):
    """x -> x M for an online site, without dense matrices where the structure allows."""
    if kind == "hadamard":
        return hadamard_transform
    if kind == "block":
        block = matrix.to(torch.float32)
        return lambda x: apply_block_rotation(x, block)
    dense = matrix.to(torch.float32)
    return lambda x: x @ dense.to(x.device)


def permuted_block_fn(perm: torch.Tensor, block: torch.Tensor):
    """x -> x P (I ⊗ R) with x P = x[..., perm], without a dense matrix (in x's dtype)."""
    return lambda x: apply_block_rotation(x[..., perm.to(x.device)], block)


def _down_transform(rot: Rotations, index: int, size: int) -> tuple[Any, Any]:
    """(fusion into a weight W <- W M, in place; online function x -> x M) of layer `index`'s R4."""
    if rot.down_kind == "permuted_block":
        fn = permuted_block_fn(rot.down_perm[index], rot.down[index])

        @torch.no_grad()
        def fuse(weight):  # W M applies M to W's rows: the online function itself, in float64
            weight.copy_(fn(weight.detach().to(torch.float64)).to(weight.dtype))

        return fuse, permuted_block_fn(rot.down_perm[index], rot.down[index].to(torch.float32))
    if rot.down_kind == "hadamard":
        matrix, fn = hadamard(size), online_fn("hadamard")
    elif rot.down_kind == "block":
        from harness.transforms import block_diagonal

        b = rot.down_block.shape[0]
        matrix, fn = block_diagonal(rot.down_block.double(), size // b), online_fn("block", rot.down_block)
    else:
        matrix = rot.down[index]
        fn = online_fn("dense", matrix)
    return lambda weight: rotate_input(weight, matrix), fn


def install_rotations(model, adapter, rot: Rotations) -> None:
    """Fold norms and fuse/install every rotation in `rot` (in place)."""
    fold_norms(adapter)
    if rot.residual is not None:
        rotate_residual(adapter, rot.residual)
    attn_modules = []
    for layer in adapter.layers():
        head = rot.head_of(layer.index)
        if head is not None:
            rotate_heads(layer, head, adapter)
        if rot.o_heads is not None:
            o = wrap_site(layer, "o")
            rotate_input(o.linear.weight, torch.kron(rot.o_heads.double(), torch.eye(adapter.head_dim, dtype=torch.float64)))
            o.input_transform = OnlineTransform(apply_fn=across_heads(rot.o_heads, adapter.head_dim), name="o across heads")
        if rot.down_kind is not None:
            for role in ("down", "shared_down"):
                if role in layer.sites:
                    down = wrap_site(layer, role)
                    fuse, fn = _down_transform(rot, layer.index, down.in_features)
                    fuse(down.linear.weight)
                    down.input_transform = OnlineTransform(apply_fn=fn, name=f"R4 {rot.down_kind}")
            if layer.experts is not None:
                experts = wrap_site(layer, "experts")
                fuse, fn = _down_transform(rot, layer.index, experts.down_proj.shape[-1])
                fuse(experts.down_proj)
                experts.down_transform = OnlineTransform(apply_fn=fn, name=f"R4 {rot.down_kind}")
        attn_modules.append(layer.attn)
    if rot.qk is not None:
        qk = rot.qk.to(torch.float32)
        install_kv_quant(model, attn_modules, None, OnlineTransform(apply_fn=lambda x: x @ qk.to(x.device), name="R3"))


@torch.no_grad()
def equivalence_error(reference_logits: torch.Tensor, model, input_ids: torch.Tensor) -> float:
    """Max |Δlogit| / max |logit| of a transformed model against the original's logits."""
    out = model(input_ids).logits.float()
    return float((out - reference_logits.float()).abs().max() / reference_logits.float().abs().max())
