"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights, then W8A8.

Per input channel j of a set of linears that read the same input,

    s_j = max|X_j|^α / max|W_:,j|^(1-α)        (both clamped at 1e-5, as the reference code)

with max|X_j| over every calibration token (one forward pass of the FP model, hooks on each site's
input) and max|W_:,j| over every quantized reader of that input. X / s is folded into the op that
produces X, W diag(s) into the readers (harness.smoothing), so the FP function is unchanged and
the activation outliers shrink by s while the weights absorb them. Then the scheme's quantizers go
in with round-to-nearest weights.

Sites (`sites`): "norms" = the paper's (q/k/v after the attention RMSNorm; gate/up after the MLP
RMSNorm, for MoE the router, every expert's gate_up and the shared expert with it); "all" adds the
v->o and up->down pairs (and each expert's up->down), which the reference repository does not smooth.
Deviations: the router's weights are scaled (exact: it stays in FP) but do not enter max|W|; a channel
that no calibration token reached (e.g. an expert never routed to) keeps s = 1; the calibration text
is the harness corpus (the paper: 512 x 512 Pile-val tokens). `steps` = calibration forward batches.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from harness.method import CalibContext, Method, MethodParams, State
from harness.registry import register_method
from harness.smoothing import (
    SiteStats,
    disparity,
    fold_scales,
    layer_sites,
    readers,
    run_calibration,
    scale_key,
    site_set,
    tie_o,
    weight_absmax,
)

EPS = 1e-5


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α), clamped at 1e-5; 1 where the channel saw no activation."""
    s = act_absmax.clamp_min(EPS).pow(alpha) / weight_absmax.clamp_min(EPS).pow(1 - alpha)
    s = s.clamp_min(EPS)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).float()


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


@register_method("smoothquant")
class SmoothQuant(Method):
    """SmoothQuant: per-channel activation-to-weight difficulty migration, then RTN quantizers."""

    version = 1

    class Params(MethodParams):
        alpha: float = Field(0.5, ge=0, le=1)  # migration strength (paper default 0.5; 0.85 for LLaMA in the repo)
        sites: Literal["norms", "all"] = "norms"  # norm-fed inputs only (paper) or also v->o, up->down
        batch_size: PositiveInt = 8  # calibration windows per forward

    def calib_scheme_key(self, scheme: Any) -> Any:
        return None  # the scales depend on the FP model and the data only

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> State:
        sites = site_set(self.params.sites)
        adapter = ctx.adapter
        with SiteStats(adapter, sites) as stats:
            batches = run_calibration(ctx.model, ctx.calib_inputs(), self.params.batch_size, ctx.progress)
        geometry = adapter.attention
        tensors: dict[str, torch.Tensor] = {}
        disp: dict[str, list[float]] = {"act_before": [], "act_after": [], "weight_before": [], "weight_after": []}
        for view in adapter.layers():
            for site in layer_sites(view, sites):
                dim = next(iter(readers(view, site).values())).shape[-1]
                act = stats.absmax(view.index, site, dim)
                if site == "o":
                    act = tie_o(act, geometry, "max")
                w = weight_absmax(view, site, geometry)
                s = smooth_scales(act, w, self.params.alpha)
                tensors[scale_key(view.index, site)] = s
                # disparity of every vector that saw tokens (each expert's own for experts_down)
                for a_row, w_row, s_row in zip(act.reshape(-1, act.shape[-1]), w.reshape(-1, w.shape[-1]),
                                               s.reshape(-1, s.shape[-1])):
                    if a_row.max() > 0:
                        disp["act_before"].append(disparity(a_row))
                        disp["act_after"].append(disparity(a_row / s_row))
                        disp["weight_before"].append(disparity(w_row))
                        disp["weight_after"].append(disparity(w_row * s_row))
        metrics = {f"{k.split('_')[0]}_disparity_{k.split('_')[1]}": _geomean(v) for k, v in disp.items()}
        meta = {"alpha": self.params.alpha, "sites": list(sites), "n_scales": len(tensors), "steps": batches,
                "metrics": metrics}
        return State(tensors=tensors, meta=meta)

    @torch.no_grad()
    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import apply_scheme

        fold_scales(adapter, state.tensors)
        self._metrics = dict(state.meta.get("metrics", {}))
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
