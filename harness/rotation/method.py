"""Base class for rotation methods: build rotations, optionally GPTQ the rotated weights, apply.

A subclass implements `build(ctx) -> Rotations` (from seeds, or from calibration statistics).
`calibrate` stores the rotations (and, with `weight_solver: gptq`, the GPTQ weights of the rotated
model, solved on a copy so the cell's model is left untouched); `apply` fuses the same rotations into
the model, writes the stored weights if any, then installs the scheme's quantizers.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from harness.method import CalibContext, Method, MethodParams, State
from harness.rotation.install import Rotations, install_rotations

WEIGHT_PREFIX = "w."


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
        from harness.models import get_adapter

        rot = self.build(ctx)
        tensors = rot.to_tensors()
        meta = {"down_kind": rot.down_kind, "info": rot.info}
        # learned rotations report their cost; the runner records meta["steps"] as calib_steps
        for key, meta_key in (("steps", "steps"), ("peak_bytes", "calib_peak_bytes")):
            if key in rot.info:
                meta[meta_key] = rot.info[key]
        weight_fmt = getattr(ctx.scheme, "weight", None)
        if self.params.weight_solver == "gptq" and weight_fmt is not None:
            from harness.gptq import gptq_quantize_model

            work = copy.deepcopy(ctx.model)
            work_adapter = get_adapter(work)
            install_rotations(work, work_adapter, rot)
            weights = gptq_quantize_model(work, work_adapter, ctx.calib_inputs(), weight_fmt,
                                          block_size=self.params.gptq_block_size, damp=self.params.gptq_damp,
                                          progress=ctx.progress)
            tensors.update({WEIGHT_PREFIX + name: w for name, w in weights.items()})
            meta["gptq"] = {"n_weights": len(weights), "weight_format": weight_fmt.name}
            del work
        return State(tensors=tensors, meta=meta)

    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import apply_scheme

        rot = Rotations.from_tensors({k: v for k, v in state.tensors.items() if k.startswith("rot.")},
                                     state.meta.get("down_kind"), state.meta.get("info"))
        install_rotations(model, adapter, rot)
        self._metrics = dict((state.meta.get("info") or {}).get("metrics", {}))
        weights = {k[len(WEIGHT_PREFIX):]: v for k, v in state.tensors.items() if k.startswith(WEIGHT_PREFIX)}
        if weights:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, w in weights.items():
                    params[name].copy_(w.to(device=params[name].device, dtype=params[name].dtype))
        apply_scheme(model, adapter, scheme, quantize_weights=not weights)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
