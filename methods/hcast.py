"""Direct cast with a block Hadamard on both operands of every linear (INT-vs-FP study, Chen et al. 2025).

"INT v.s. FP" quantizes each linear's input X and weight W along the reduction dim, optionally after a
32x32 random Hadamard applied block-wise to both (x -> x (I ⊗ H), W -> W (I ⊗ H)), which leaves X Wᵀ
unchanged. No calibration; the rotation is online on the input and fused into the weight.
"""
from __future__ import annotations

from harness.method import Method, MethodParams, State
from harness.registry import register_method
from harness.rotation.fuse import OnlineTransform, rotate_input
from harness.rotation.install import online_fn
from harness.transforms import block_diagonal, random_hadamard


@register_method("hcast")
class BlockHadamardCast(Method):
    """RTN of W and A after a block-wise random Hadamard on both operands of each linear."""

    version = 1
    needs_calibration = False

    class Params(MethodParams):
        block: int = 32

    def calibrate(self, ctx) -> State:
        return State(tensors={"h": random_hadamard(self.params.block, ctx.seed)}, meta={"block": self.params.block})

    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import QuantExperts, apply_scheme
        from harness.quant.apply import _linear_sites, wrap_linear

        h = state.tensors["h"]
        transform = OnlineTransform(apply_fn=online_fn("block", h), name=f"block Hadamard {h.shape[0]}")

        def rotate(weight):
            rotate_input(weight, block_diagonal(h.double(), weight.shape[-1] // h.shape[0]))

        for layer in adapter.layers():
            for parent, attr in _linear_sites(layer):
                lin = wrap_linear(parent, attr)
                rotate(lin.linear.weight)
                lin.input_transform = transform
            if layer.experts is not None:
                experts = layer.experts.module
                if not isinstance(experts, QuantExperts):
                    experts = QuantExperts(experts)
                    layer.experts.parent.experts = experts
                rotate(experts.gate_up_proj)
                rotate(experts.down_proj)
                experts.input_transform, experts.down_transform = transform, transform
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model
