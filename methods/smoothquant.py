"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights, then W8A8.

Per input channel j of a set of linears that read the same input,

    s_j = max|X_j|^α / max|W_:,j|^(1-α)        (both clamped at 1e-5, as the reference code)

with max|X_j| over every calibration token (one pass of the FP model over the calibration windows,
decoder layer by decoder layer, hooks on each site's input) and max|W_:,j| over every quantized reader
of that input. X / s is folded into the op that produces X, W diag(s) into the readers
(harness.smoothing), so the FP function is unchanged and the activation outliers shrink by s while the
weights absorb them. Then the scheme's quantizers go in with round-to-nearest weights.

Sites (`sites`): "norms" = the paper's (q/k/v after the attention RMSNorm; gate/up after the MLP
RMSNorm, for MoE the router, every expert's gate_up and the shared expert with it); "all" adds the
v->o and up->down pairs (and each expert's up->down), which the reference repository does not smooth.
Deviations: the router's weights are scaled (exact: it stays in FP) but do not enter max|W|; a channel
that no calibration token reached (e.g. an expert never routed to) keeps s = 1; the calibration text
is the harness corpus (the paper: 512 x 512 Pile-val tokens). `steps` = calibration forward batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from harness.calib import walk_layers
from harness.method import CalibContext, Method, MethodParams
from harness.registry import register_method
from harness.smoothing import (
    Disparity,
    LayerScales,
    SiteStats,
    fold_scales,
    site_set,
    tie_o,
    weight_absmax,
)
from harness.state import State

EPS = 1e-5


@dataclass(kw_only=True)
class SmoothQuantState(State):
    """Per decoder layer, the smoothing scale of each smoothed site ({site: s})."""

    scales: list[LayerScales] = field(default_factory=list)


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α), clamped at 1e-5; 1 where the channel saw no activation."""
    s = act_absmax.clamp_min(EPS).pow(alpha) / weight_absmax.clamp_min(EPS).pow(1 - alpha)
    s = s.clamp_min(EPS)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).float()


@register_method("smoothquant")
class SmoothQuant(Method):
    """SmoothQuant: per-channel activation-to-weight difficulty migration, then RTN quantizers."""

    version = 1
    state_type = SmoothQuantState
    conformance_params = {"sites": "all"}  # every site kind folded: the 16-bit check covers them all

    class Params(MethodParams):
        alpha: float = Field(0.5, ge=0, le=1)  # migration strength (paper default 0.5; 0.85 for LLaMA in the repo)
        sites: Literal["norms", "all"] = "norms"  # norm-fed inputs only (paper) or also v->o, up->down
        batch_size: PositiveInt = 8  # calibration windows per forward

    def calib_scheme_key(self, scheme: Any) -> Any:
        return None  # the scales depend on the FP model and the data only

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> SmoothQuantState:
        sites, alpha = site_set(self.params.sites), self.params.alpha
        geometry = ctx.adapter.attention
        scales: list[LayerScales] = []
        disp = Disparity()
        for step in walk_layers(ctx.model, ctx.adapter, ctx.calib_inputs(), self.params.batch_size,
                                progress=ctx.progress, desc="SmoothQuant layers"):
            with SiteStats(step.view, sites) as stats:
                step.run()  # the FP layer on the calibration tokens: max|X_j| of each site's input
            scales.append({})
            for site in stats.sites:
                act = stats.absmax(site)
                if site == "o":
                    act = tie_o(act, geometry, "max")
                w = weight_absmax(step.view, site, geometry)
                scales[-1][site] = smooth_scales(act, w, alpha)
                disp.add(act, w, scales[-1][site])
        meta = {"alpha": alpha, "sites": list(sites), "n_scales": sum(map(len, scales)),
                "steps": len(step.hidden), "metrics": disp.metrics()}  # steps: forward batches per layer
        return SmoothQuantState(scales=scales, meta=meta)

    @torch.no_grad()
    def apply(self, model, adapter, state: SmoothQuantState, scheme):
        from harness.quant import apply_scheme

        fold_scales(adapter, state.scales)
        self._metrics = dict(state.meta.get("metrics", {}))
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
