"""Base class for rotation methods: build rotations, optionally GPTQ the rotated weights, apply.

A subclass implements `build(ctx) -> Rotations` (from seeds, or from calibration statistics).
`calibrate` stores the rotations (and, with `weight_solver: gptq`, the GPTQ weights of the rotated
model, solved on a copy so the cell's model is left untouched); `apply` fuses the same rotations into
the model, writes the stored weights if any, then installs the scheme's quantizers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from harness.method import CalibContext, Method, MethodParams, load_solved_weights
from harness.rotation.install import Rotations, install_rotations
from harness.state import State


class RotationParams(MethodParams):
    # gptaq: GPTQ with GPTAQ's asymmetric calibration (the FP model's outputs as target, the quantized
    # prefix's inputs with the scheme's activation quantizers installed, as its official --enable_aq_calibration)
    weight_solver: Literal["rtn", "gptq", "gptaq"] = "gptq"
    gptaq_alpha: float = Field(0.25, ge=0)
    gptq_damp: NonNegativeFloat = 0.01
    gptq_block_size: PositiveInt = 128
    # QuaRot's / SpinQuant's official weight quantizer: `--w_clip` (a per-group clipping search, for GPTQ and
    # RTN weights alike) and GPTQ solved q/k/v -> o -> up/gate -> down, each stage after the previous one
    w_clip: bool = True
    gptq_true_sequential: bool = True


@dataclass(kw_only=True)
class RotationState(State):
    """The rotations (float64) and, with `weight_solver: gptq`, the GPTQ weights by parameter name;
    `meta["info"]` keeps what the build measured (losses, timings, the method's metrics)."""

    rotations: Rotations
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


class RotationMethod(Method):
    Params = RotationParams
    state_type = RotationState

    def build(self, ctx: CalibContext) -> Rotations:
        raise NotImplementedError

    def calib_scheme_key(self, scheme: Any) -> Any:
        # the rotations depend on the data only; GPTQ weights also on the weight format
        if self.params.weight_solver == "rtn":
            return None
        key = {"weight": scheme.weight.to_dict() if getattr(scheme, "weight", None) else None}
        if self.params.weight_solver == "gptaq":  # its quantized stream runs the activation / KV quantizers
            for part in ("activation", "kv"):
                fmt = getattr(scheme, part, None)
                key[part] = fmt.to_dict() if fmt is not None else None
        return key

    def calibrate(self, ctx: CalibContext) -> RotationState:
        rot = self.build(ctx).as_float64()
        # what the build measured (losses, timings, diagnostics) is run info, not part of the transform
        meta: dict[str, Any] = {"info": rot.info}
        rot.info = {}
        # learned rotations report their cost; the runner records meta["steps"] as calib_steps
        for key, meta_key in (("steps", "steps"), ("peak_bytes", "calib_peak_bytes")):
            if key in meta["info"]:
                meta[meta_key] = meta["info"][key]
        weights = self.solve_weights(ctx, lambda work, adapter: install_rotations(work, adapter, rot), meta)
        return RotationState(rotations=rot, weights=weights, meta=meta)

    def solve_weights(self, ctx: CalibContext, install, meta: dict) -> dict[str, torch.Tensor]:
        """With `weight_solver: gptq` and a weight format: GPTQ weights {parameter name: tensor} of the model
        as `install(model, adapter)` transforms it, solved on a copy (`apply` writes them instead of RTN)."""
        weight_fmt = ctx.scheme.weight
        if self.params.weight_solver == "rtn" or weight_fmt is None:
            return {}
        from harness.gptq import gptq_after_transform

        alpha = None
        if self.params.weight_solver == "gptaq":
            alpha, transform, scheme = self.params.gptaq_alpha, install, ctx.scheme

            def install(work, adapter):  # the transform, then the scheme's activation / KV quantizers
                from harness.quant import apply_scheme

                transform(work, adapter)
                apply_scheme(work, adapter, scheme, quantize_weights=False)
        weights = gptq_after_transform(ctx.model, install, ctx.calib_inputs(), weight_fmt,
                                       block_size=self.params.gptq_block_size, damp=self.params.gptq_damp,
                                       progress=ctx.progress, mse_clip=self.params.w_clip,
                                       true_sequential=self.params.gptq_true_sequential, alpha=alpha)
        meta["gptq"] = {"n_weights": len(weights), "weight_format": weight_fmt.name, "w_clip": self.params.w_clip,
                        "true_sequential": self.params.gptq_true_sequential, "gptaq_alpha": alpha}
        return dict(weights)

    def install(self, model, adapter, state: RotationState) -> None:
        """Fuse the method's transform into `model` (the rotations; subclasses may add their own parts)."""
        install_rotations(model, adapter, state.rotations)

    def apply(self, model, adapter, state: RotationState, scheme):
        from harness.quant import apply_scheme

        self.install(model, adapter, state)
        self._metrics = dict(state.meta.get("info", {}).get("metrics", {}))
        if self.params.weight_solver == "gptaq" and state.weights:
            # solved on a model with the scheme's wrappers installed: their parameter names, so wrap first
            apply_scheme(model, adapter, scheme, quantize_weights=False)
            load_solved_weights(model, state.weights)
            return model
        solved = load_solved_weights(model, state.weights)
        apply_scheme(model, adapter, scheme, quantize_weights=not solved, weight_rounding=self.weight_rounding())
        return model

    def weight_rounding(self):
        """How RTN weights are rounded: with the clipping search (`w_clip`, the official default), else plain."""
        if not self.params.w_clip:
            return None
        from harness.gptq import clip_searched_rtn

        return clip_searched_rtn

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
