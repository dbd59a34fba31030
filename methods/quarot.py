"""QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs (Ashkboos et al., NeurIPS 2024).

R1: randomised Hadamard of the hidden size, fused into the weights; R2: Hadamard per head on V/O;
R3: online Hadamard on Q and K after RoPE (for KV-cache quantization); R4: online Hadamard of the
MLP width before down_proj. Non-power-of-two sizes (576 = 36·16, 1536 = 12·128) use H_m ⊗ H_2^k.
o_proj's input sees the full Hadamard H_heads ⊗ H_hd, as in the official code (`rotate_ov_proj` fuses
it into o_proj, `online_partial_had` applies H_heads across heads online): R2 gives the per-head part,
`o_heads` the cross-head part. Weights GPTQ (the paper's default) or RTN.

Deviations from spcl/QuaRot:
- a head count with no Hadamard matrix (SmolLM2: 9 heads) gets a seeded Haar-random orthogonal
  cross-head matrix instead (the official code has no matrix of that order and would stop); recorded in
  the run's info as `o_heads`. Likely effect: about the same spreading of o_proj's input across heads.
- `cross_heads: false` reproduces the per-head-only variant (the ablation).
"""
from __future__ import annotations

from typing import Literal

from harness.registry import register_method
from harness.rotation.install import Rotations
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import hadamard, is_hadamard_order, random_hadamard, random_orthogonal


@register_method("quarot")
class QuaRot(RotationMethod):
    """Random Hadamard rotations (R1 fused, R2 per head, R3 online on Q/K, R4 online before down)."""

    version = 2  # 2: o_proj's input gets the cross-head Hadamard (full H_heads ⊗ H_hd, as the official code)

    class Params(RotationParams):
        rotation: Literal["hadamard", "random"] = "hadamard"  # random: Haar orthogonal (the paper's ablation)
        rotate_kv: bool = True  # R3 on Q/K
        cross_heads: bool = True  # o_proj input: full H_heads ⊗ H_hd (official), else per head only

    def build(self, ctx):
        adapter, seed = ctx.adapter, ctx.seed
        d, hd = adapter.hidden_size, adapter.head_dim
        r1 = random_hadamard(d, seed) if self.params.rotation == "hadamard" else random_orthogonal(d, seed)
        info = {"r1": self.params.rotation, "seed": seed}
        o_heads = None
        if self.params.cross_heads:
            o_heads, info["o_heads"] = cross_head_matrix(adapter.num_heads, seed)
        return Rotations(residual=r1, head=hadamard(hd), qk=hadamard(hd) if self.params.rotate_kv else None,
                         down_kind="hadamard", o_heads=o_heads, info=info)


def cross_head_matrix(num_heads: int, seed: int):
    """(H_heads normalised, "hadamard") when a Hadamard matrix of that order exists, else a seeded Haar
    orthogonal matrix and why."""
    if is_hadamard_order(num_heads):
        return hadamard(num_heads), "hadamard"
    return random_orthogonal(num_heads, seed + 1), f"random orthogonal (no Hadamard matrix of order {num_heads})"
