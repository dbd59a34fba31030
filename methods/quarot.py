"""QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs (Ashkboos et al., NeurIPS 2024).

R1: randomised Hadamard of the hidden size, fused into the weights; R2: Hadamard per head on V/O;
R3: online Hadamard on Q and K after RoPE (for KV-cache quantization); R4: online Hadamard of the
MLP width before down_proj. Non-power-of-two sizes (576 = 36·16, 1536 = 12·128) use H_m ⊗ H_2^k.
Weights GPTQ (the paper's default) or RTN.
"""
from __future__ import annotations

from typing import Literal

from harness.registry import register_method
from harness.rotation.install import Rotations
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import hadamard, random_hadamard, random_orthogonal


@register_method("quarot")
class QuaRot(RotationMethod):
    """Random Hadamard rotations (R1 fused, R2 per head, R3 online on Q/K, R4 online before down)."""

    version = 1

    class Params(RotationParams):
        rotation: Literal["hadamard", "random"] = "hadamard"  # random: Haar orthogonal (the paper's ablation)
        rotate_kv: bool = True  # R3 on Q/K

    def build(self, ctx):
        adapter, seed = ctx.adapter, ctx.seed
        d, hd = adapter.hidden_size, adapter.head_dim
        r1 = random_hadamard(d, seed) if self.params.rotation == "hadamard" else random_orthogonal(d, seed)
        return Rotations(residual=r1, head=hadamard(hd), qk=hadamard(hd) if self.params.rotate_kv else None,
                         down_kind="hadamard", info={"r1": self.params.rotation, "seed": seed})
