"""GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers (Frantar et al., 2023).

Calibration runs the layer-wise GPTQ solver of `harness.gptq` on the calibration windows and keeps
the quantized weights as the state; `apply` writes those weights into a fresh model and installs the
scheme's activation/KV quantizers (the weights are already on the grid, so they are not re-rounded).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, PositiveInt

from harness.method import CalibContext, Method, MethodParams, load_solved_weights
from harness.registry import register_method
from harness.state import State


@dataclass(kw_only=True)
class GPTQState(State):
    """The GPTQ-solved weights by parameter name (empty when the scheme keeps weights in FP)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _fmt_dict(fmt: Any) -> Any:
    if fmt is None or isinstance(fmt, (str, dict)):
        return fmt
    return fmt.to_dict() if hasattr(fmt, "to_dict") else str(fmt)


@register_method("gptq")
class GPTQ(Method):
    """GPTQ (Frantar et al., 2023): layer-wise second-order weight rounding on calibration data."""

    version = 1
    state_type = GPTQState
    conformance_params = {"block_size": 32}

    class Params(MethodParams):
        block_size: PositiveInt = 128  # columns updated together (the paper's lazy batch)
        damp: float = Field(0.01, gt=0, le=1)  # dampening, a fraction of the mean Hessian diagonal
        act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
        static_groups: bool = False  # with act_order: group scales fixed before the reordering
        mse_clip: bool = False  # search a per-group clipping ratio that minimises the weight error
        true_sequential: bool = False  # q/k/v -> o -> gate/up -> down solved one after another in a layer

    def calib_scheme_key(self, scheme: Any) -> Any:
        # GPTQ sees full-precision activations during calibration: only the weight format matters.
        return {"weight": _fmt_dict(scheme.weight if scheme is not None else None)}

    def calibrate(self, ctx: CalibContext) -> GPTQState:
        fmt = ctx.scheme.weight
        if fmt is None:
            return GPTQState(meta={"note": "scheme keeps weights in full precision; nothing to solve"})
        from harness.gptq import gptq_quantize_model

        # The solver writes the quantized weights into ctx.model as it goes (the next layer's inputs
        # must come from quantized layers); `apply` writes the same tensors, so a cached state on a
        # fresh model gives the same model.
        weights = gptq_quantize_model(ctx.model, ctx.adapter, ctx.calib_inputs(), fmt, progress=ctx.progress,
                                      **self.params.model_dump())
        solved = {name: w.detach().to("cpu") for name, w in dict(weights).items()}
        return GPTQState(weights=solved, meta={"weight_format": _fmt_dict(fmt), "n_weights": len(solved),
                                               "report": weights.report})

    def apply(self, model, adapter, state: GPTQState, scheme):
        from harness.quant import apply_scheme

        load_solved_weights(model, state.weights)
        return apply_scheme(model, adapter, scheme, quantize_weights=False)
