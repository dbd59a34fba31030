"""EAC-MoE: Expert-Selection Aware Compressor for MoE LLMs (Chen, Shao, Wang, Cheng, ACL 2025, arXiv
2508.01625). No official code; built from the paper's description (papers.md B17).

The paper's diagnosis: quantizing an MoE model shifts its expert selection ("expert shift"), and that,
more than the weight error itself, costs accuracy. QESC (quantization with expert-selection calibration):
1. the FP model's router logits z_l(x) on the calibration tokens, every MoE layer (the targets);
2. the experts and the other linears are quantized (GPTQ here, the harness's layer-wise solver; `base: rtn`
   rounds to nearest);
3. layer by layer, on the inputs the quantized model (its activation / KV quantizers on) gives layer l —
   with the routers before l already calibrated — the router's weight W_l (kept in full precision) is
   trained so that the quantized model's router distribution matches the FP one on the same tokens:
   minimise KL(softmax(z_l) || softmax(router_l(x̃))) with Adam, `steps` full-batch steps at `lr`.
PESF (pruned-expert selection by frequency, `prune_fraction` > 0): per MoE layer the experts the FP model
selects least often on the calibration tokens are removed from the pool (at least top-k stay); the router
picks its top-k among the others and its distribution is renormalised over them
(harness.models.adapters.routing.prune_experts). QESC then calibrates the routers with the pruning in place.

The router is trained through its own forward (any router whose forward returns logits first, CMoE's
analytical router included), so selection and combine weights follow the calibrated logits.

Deviations (likely effect):
- GPTQ quantizes every layer first and the routers are calibrated afterwards, in one layer-wise pass (the
  paper interleaves quantizing layer l and calibrating its router): layer l+1's GPTQ Hessians come from
  the uncalibrated routing of the layers before it — small, since a router changes only routing;
- the loss is the KL of the full router distributions (the paper's exact loss was not readable; it aligns
  the top-k selection): it also aligns the combine weights;
- PESF is static here: the experts pruned are those the FP model selects least on the calibration tokens
  (the task's data stands in for the task), fixed for the run, instead of per request at inference;
- the calibrated routers are plain FP weights; the scheme never quantizes routers;
- the quantized stream runs on a copy of the model (2x the model's memory during calibration).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from harness.calib import walk_layers
from harness.method import CalibContext, Method, MethodParams, load_solved_weights
from harness.registry import register_method
from harness.state import State
from methods.gptq import _fmt_dict


@dataclass(kw_only=True)
class EACMoEState(State):
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # quantized linears and experts
    routers: dict[str, torch.Tensor] = field(default_factory=dict)  # calibrated router weights (FP)
    pruned: dict[str, list[int]] = field(default_factory=dict)  # PESF: per MoE layer, the experts removed


def router_inputs(model, adapter, calib: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per MoE layer, the router logits of `model` on the calibration windows ({layer: [T, E]})."""
    out: dict[int, list[torch.Tensor]] = {}
    handles = []
    for view in adapter.layers():
        if view.experts is not None:
            handles.append(view.experts.router.register_forward_hook(
                lambda _m, _a, o, i=view.index: out.setdefault(i, []).append(o[0].float())))
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch_size):
                model(calib[i:i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in out.items()}


def calibrate_router(router: torch.nn.Module, x: torch.Tensor, target_logits: torch.Tensor, steps: int,
                     lr: float) -> dict[str, float]:
    """Train `router.weight` in place: min KL(softmax(target) || softmax(router(x) logits)), full batch."""
    target = F.log_softmax(target_logits, dim=-1)
    weight = router.weight
    original = weight.detach().clone()
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)

    def loss_now() -> torch.Tensor:
        logits = router(x)[0].float()
        return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")

    with torch.enable_grad():
        before = float(loss_now().detach())
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_now()
            loss.backward()
            opt.step()
    weight.requires_grad_(False)
    with torch.no_grad():
        after = float(loss_now())
        if after > before:  # never worse than the uncalibrated router on its own objective
            weight.copy_(original)
            after = before
    return {"kl_before": before, "kl_after": after}


def least_selected(logits: torch.Tensor, top_k: int, fraction: float) -> list[int]:
    """PESF: the floor(fraction x E) experts selected least often (top-k of `logits`), keeping >= top_k."""
    n = logits.shape[1]
    drop = min(int(fraction * n), n - top_k)
    counts = torch.bincount(logits.topk(top_k, -1).indices.reshape(-1), minlength=n)
    return sorted(torch.argsort(counts, stable=True)[:drop].tolist()) if drop > 0 else []


def install_pruning(adapter, pruned: dict[str, list[int]]) -> None:
    from harness.models.adapters.routing import prune_experts

    for view in adapter.layers():
        if view.experts is not None and pruned.get(str(view.index)):
            prune_experts(view.experts.router, pruned[str(view.index)])


def experts_kept(adapter, pruned: dict[str, list[int]]) -> float:
    views = [v for v in adapter.layers() if v.experts is not None]
    total = sum(v.experts.num_experts for v in views)
    return 1.0 - sum(len(pruned.get(str(v.index), [])) for v in views) / total


def top_k_agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Fraction of tokens whose top-k sets of logits a and b are equal."""
    return float((a.topk(k, -1).indices.sort(-1).values == b.topk(k, -1).indices.sort(-1).values).all(-1).float().mean())


@register_method("eac_moe")
class EACMoE(Method):
    """GPTQ (or RTN) + router re-calibration so the quantized model selects the FP model's experts."""

    version = 1
    state_type = EACMoEState
    uses_seed = False
    conformance_params = {"steps": 5}

    class Params(MethodParams):
        base: Literal["gptq", "rtn"] = "gptq"
        steps: PositiveInt = 200  # Adam steps per router (full batch of calibration tokens)
        lr: float = Field(1e-3, gt=0, le=1)
        block_size: PositiveInt = 128  # GPTQ's
        damp: float = Field(0.01, gt=0, le=1)
        prune_fraction: float = Field(0.0, ge=0, lt=1)  # PESF: share of each layer's routed experts removed

    def calib_scheme_key(self, scheme: Any) -> Any:
        if scheme is None:
            return None
        return {"weight": _fmt_dict(scheme.weight), "activation": _fmt_dict(scheme.activation), "kv": _fmt_dict(scheme.kv)}

    def calibrate(self, ctx: CalibContext) -> EACMoEState:
        from harness.gptq import gptq_quantize_model
        from harness.models import get_adapter
        from harness.quant import apply_scheme

        p, model, adapter = self.params, ctx.model, ctx.adapter
        calib = ctx.calib_inputs()
        if not adapter.is_moe:
            from harness.errors import InvalidValueError

            raise InvalidValueError("model for eac_moe", adapter.family, "an MoE model (qwen2_moe, qwen3_moe, ...)")
        fp_logits = router_inputs(model, adapter, calib)  # 1. the targets
        pruned = {str(v.index): least_selected(fp_logits[v.index], v.experts.top_k, p.prune_fraction)
                  for v in adapter.layers() if v.experts is not None and p.prune_fraction > 0}
        weights: dict[str, torch.Tensor] = {}
        fmt = ctx.scheme.weight if ctx.scheme is not None else None
        if fmt is not None and p.base == "gptq":  # 2.
            solved = gptq_quantize_model(model, adapter, calib, fmt, block_size=p.block_size, damp=p.damp,
                                         progress=ctx.progress)
            weights = {name: w.detach().to("cpu") for name, w in dict(solved).items()}
        # the quantized model as it will run (RTN weights when base is rtn), on a copy: calibrate leaves
        # ctx.model as apply expects it (FP, or GPTQ weights that apply writes again)
        quantized = copy.deepcopy(model)
        qadapter = get_adapter(quantized)
        apply_scheme(quantized, qadapter, ctx.scheme or "w16a16", quantize_weights=(p.base == "rtn"))
        install_pruning(qadapter, pruned)
        routers, meta = {}, {"kl_before": [], "kl_after": [], "agreement_before": [], "agreement_after": []}
        names = {id(m): n for n, m in quantized.named_modules()}
        for step in walk_layers(quantized, qadapter, calib, batch_size=8, progress=ctx.progress, desc="qesc"):  # 3.
            view = step.view
            if view.experts is None:
                continue
            router = view.experts.router
            seen: list[torch.Tensor] = []
            handle = router.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
            try:
                step.forward()
            finally:
                handle.remove()
            x, target = torch.cat(seen), fp_logits[view.index]
            k = view.experts.top_k
            with torch.no_grad():
                meta["agreement_before"].append(top_k_agreement(router(x)[0].float(), target, k))
            losses = calibrate_router(router, x, target, p.steps, p.lr)
            with torch.no_grad():
                meta["agreement_after"].append(top_k_agreement(router(x)[0].float(), target, k))
            meta["kl_before"].append(losses["kl_before"])
            meta["kl_after"].append(losses["kl_after"])
            routers[f"{names[id(router)]}.weight"] = router.weight.detach().to("cpu").clone()
            step.run()  # the next layer sees this router calibrated
        del quantized
        meta["experts_kept_fraction"] = experts_kept(adapter, pruned)
        return EACMoEState(weights=weights, routers=routers, pruned=pruned, meta=meta)

    def apply(self, model, adapter, state: EACMoEState, scheme):
        from harness.quant import apply_scheme

        self._meta = state.meta
        load_solved_weights(model, {**state.weights, **state.routers})
        rtn = self.params.base == "rtn"
        model = apply_scheme(model, adapter, scheme or "w16a16", quantize_weights=rtn)
        install_pruning(adapter, state.pruned)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        meta = getattr(self, "_meta", None) or {}
        if not meta.get("kl_before"):
            return {}
        mean = lambda v: float(sum(v) / len(v))  # noqa: E731
        return {"experts_kept_fraction": float(meta.get("experts_kept_fraction", 1.0)),"calib_router_kl_before": mean(meta["kl_before"]), "calib_router_kl_after": mean(meta["kl_after"]),
                "calib_agreement_before": mean(meta["agreement_before"]),
                "calib_agreement_after": mean(meta["agreement_after"])}
