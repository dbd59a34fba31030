"""BRQ: Block Rotation is All You Need for MXFP4 Quantization (Shao et al., 2025).

Every rotation of QuaRot is replaced by a block-diagonal one whose block equals the format's block
(32 for MX), so outlier energy is only redistributed inside a block that shares one scale:
R1 = I ⊗ (D H_b) fused, R2 = per head I ⊗ (D H_b), R4 = I ⊗ (D H_b) online before down_proj,
optional R3 = I ⊗ H_b on Q/K. Weights GPTQ (the paper's choice) or RTN.
"""
from __future__ import annotations

from pydantic import PositiveInt

from harness.registry import register_method
from harness.rotation.install import Rotations
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import block_diagonal, hadamard, random_hadamard


@register_method("brq")
class BlockRotation(RotationMethod):
    """Block-diagonal randomised Hadamard rotations with block = the MX block."""

    version = 1
    conformance_params = {"weight_solver": "rtn"}

    class Params(RotationParams):
        block: PositiveInt = 32
        rotate_kv: bool = True

    def build(self, ctx):
        adapter, seed, b = ctx.adapter, ctx.seed, self.params.block
        d, hd = adapter.hidden_size, adapter.head_dim
        head_block = min(b, hd)
        return Rotations(
            residual=block_diagonal(random_hadamard(b, seed), d // b),
            head=block_diagonal(random_hadamard(head_block, seed + 1), hd // head_block),
            qk=block_diagonal(hadamard(head_block), hd // head_block) if self.params.rotate_kv else None,
            down_kind="block", down_block=random_hadamard(b, seed + 2),
            info={"block": b, "seed": seed},
        )
