"""Direct cast with a block Hadamard on both operands of every linear (INT-vs-FP study, Chen et al. 2025).

"INT v.s. FP" quantizes each linear's input X and weight W along the reduction dim, optionally after a
32x32 random Hadamard applied block-wise to both (x -> x (I ⊗ H), W -> W (I ⊗ H)), which leaves X Wᵀ
unchanged. No calibration; the rotation is online on the input and fused into the weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import PositiveInt

from harness.method import Method, MethodParams
from harness.registry import register_method
from harness.rotation.fuse import OnlineTransform, rotate_input
from harness.rotation.install import online_fn
from harness.state import State
from harness.transforms import block_diagonal, random_hadamard


@dataclass(kw_only=True)
class HcastState(State):
    hadamard: torch.Tensor  # the block x block random Hadamard applied to both operands


@register_method("hcast")
class BlockHadamardCast(Method):
    """RTN of W and A after a block-wise random Hadamard on both operands of each linear."""

    version = 1
    needs_calibration = False
    state_type = HcastState

    class Params(MethodParams):
        block: PositiveInt = 32

    def calibrate(self, ctx) -> HcastState:
        return HcastState(hadamard=random_hadamard(self.params.block, ctx.seed), meta={"block": self.params.block})

    def apply(self, model, adapter, state: HcastState, scheme):
        from harness.quant import apply_scheme, wrap_layer

        h = state.hadamard
        transform = OnlineTransform(apply_fn=online_fn("block", h), name=f"block Hadamard {h.shape[0]}")

        def rotate(weight):
            rotate_input(weight, block_diagonal(h.double(), weight.shape[-1] // h.shape[0]))

        for layer in adapter.layers():
            wrapped = wrap_layer(layer)
            experts = wrapped.pop("experts", None)
            for lin in wrapped.values():
                rotate(lin.linear.weight)
                lin.input_transform = transform
            if experts is not None:
                rotate(layer.experts.gate_up)
                rotate(layer.experts.down)
                experts.input_transform, experts.down_transform = transform, transform
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model
