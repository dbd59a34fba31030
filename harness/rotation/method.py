"""Base class for rotation methods: build rotations, optionally GPTQ the rotated weights, apply.

A subclass implements `build(ctx) -> Rotations` (from seeds, or from calibration statistics).
`calibrate` stores the rotations (and, with `weight_solver: gptq`, the GPTQ weights of the rotated
model, solved on a copy so the cell's model is left untouched); `apply` fuses the same rotations into
the model, writes the stored weights if any, then installs the scheme's quantizers.
"""
from __future__ import annotations

from typing import Any, Literal

from harness.method import (
    CalibContext,
    Method,
    MethodParams,
    State,
    load_solved_weights,
    solved_weight_tensors,
)
from harness.rotation.install import Rotations, install_rotations


class RotationParams(MethodParams):
    weight_solver: Literal["rtn", "gptq"] = "gptq"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128


class RotationMethod(Method):
    Params = RotationParams

    def build(self, ctx: CalibContext) -> Rotations:
        raise NotImplementedError

    def calib_scheme_key(self, scheme: Any) -> Any:
        # the rotations depend on the data only; GPTQ weights also on the weight format
        if self.params.weight_solver == "rtn":
            return None
        return {"weight": scheme.weight.to_dict() if getattr(scheme, "weight", None) else None}

    def calibrate(self, ctx: CalibContext) -> State:
        rot = self.build(ctx)
        tensors = rot.to_tensors()
        meta = {"down_kind": rot.down_kind, "info": rot.info}
        # learned rotations report their cost; the runner records meta["steps"] as calib_steps
        for key, meta_key in (("steps", "steps"), ("peak_bytes", "calib_peak_bytes")):
            if key in rot.info:
                meta[meta_key] = rot.info[key]
        self.solve_weights(ctx, lambda work, adapter: install_rotations(work, adapter, rot), tensors, meta)
        return State(tensors=tensors, meta=meta)

    def solve_weights(self, ctx: CalibContext, install, tensors: dict, meta: dict) -> None:
        """With `weight_solver: gptq` and a weight format: GPTQ weights of the model as `install(model, adapter)`
        transforms it, solved on a copy, added to `tensors` (`apply` writes them instead of RTN)."""
        weight_fmt = getattr(ctx.scheme, "weight", None)
        if self.params.weight_solver != "gptq" or weight_fmt is None:
            return
        from harness.gptq import gptq_after_transform

        weights = gptq_after_transform(ctx.model, install, ctx.calib_inputs(), weight_fmt,
                                       block_size=self.params.gptq_block_size, damp=self.params.gptq_damp,
                                       progress=ctx.progress)
        tensors.update(solved_weight_tensors(weights))
        meta["gptq"] = {"n_weights": len(weights), "weight_format": weight_fmt.name}

    def install(self, model, adapter, rot: Rotations, state: State) -> None:
        """Fuse the method's transform into `model` (the rotations; subclasses may add their own parts)."""
        install_rotations(model, adapter, rot)

    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import apply_scheme

        rot = Rotations.from_tensors({k: v for k, v in state.tensors.items() if k.startswith("rot.")},
                                     state.meta.get("down_kind"), state.meta.get("info"))
        self.install(model, adapter, rot, state)
        self._metrics = dict((state.meta.get("info") or {}).get("metrics", {}))
        solved = load_solved_weights(model, state)
        apply_scheme(model, adapter, scheme, quantize_weights=not solved)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
