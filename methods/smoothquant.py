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

`static_activations` (the paper's O3 with a per-tensor activation format): the same pass also records,
per site, the largest |x / s| over the calibration tokens, and every linear reading that site quantizes
its input with that fixed scale (harness.quant.static; values beyond it saturate). The paper calibrates
O3 scales on the same Pile-val samples; here, the harness calibration set. BMM inputs stay unquantized.
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
    expand_o,
    fold_scales,
    site_set,
    tie_o,
    weight_absmax,
)
from harness.state import State

EPS = 1e-5


@dataclass(kw_only=True)
class SmoothQuantState(State):
    """Per decoder layer, the smoothing scale of each smoothed site ({site: s}); with static activations,
    per layer the calibrated max |x| of each site's input after smoothing ({site: scalar})."""

    scales: list[LayerScales] = field(default_factory=list)
    static_amax: list[LayerScales] = field(default_factory=list)


#: the linears reading each site's input (a static scale per site: they read the same tensor)
SITE_ROLES = {"qkv": ("q", "k", "v"), "o": ("o",), "mlp_in": ("gate", "up"), "down": ("down",)}


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α), clamped at 1e-5; 1 where the channel saw no activation."""
    s = act_absmax.clamp_min(EPS).pow(alpha) / weight_absmax.clamp_min(EPS).pow(1 - alpha)
    s = s.clamp_min(EPS)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).float()


@register_method("smoothquant")
class SmoothQuant(Method):
    """SmoothQuant: per-channel activation-to-weight difficulty migration, then RTN quantizers."""

    version = 2  # 2: static per-tensor activation scales (O3) as an option
    state_type = SmoothQuantState
    conformance_params = {"sites": "all"}  # every site kind folded: the 16-bit check covers them all

    class Params(MethodParams):
        alpha: float = Field(0.5, ge=0, le=1)  # migration strength (paper default 0.5; 0.85 for LLaMA in the repo)
        sites: Literal["norms", "all"] = "norms"  # norm-fed inputs only (paper) or also v->o, up->down
        batch_size: PositiveInt = 8  # calibration windows per forward
        # O3: every linear's input quantized with a per-tensor scale fixed from the calibration data (the
        # scheme's activation format must be symmetric per-tensor, e.g. int8_tensor); dense models only
        static_activations: bool = False

    def calib_scheme_key(self, scheme: Any) -> Any:
        return None  # the scales depend on the FP model and the data only

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> SmoothQuantState:
        sites, alpha, static = site_set(self.params.sites), self.params.alpha, self.params.static_activations
        geometry = ctx.adapter.attention
        if static:
            self._check_static(ctx.adapter, ctx.scheme)
        scales: list[LayerScales] = []
        amax: list[LayerScales] = []
        disp = Disparity()
        for step in walk_layers(ctx.model, ctx.adapter, ctx.calib_inputs(), self.params.batch_size,
                                progress=ctx.progress, desc="SmoothQuant layers"):
            # the FP layer on the calibration tokens: max|X_j| of each site's input (every site when the
            # static scales need them)
            with SiteStats(step.view, site_set("all") if static else sites) as stats:
                step.run()
            scales.append({})
            for site in (s for s in stats.sites if s in sites):
                act = stats.absmax(site)
                if site == "o":
                    act = tie_o(act, geometry, "max")
                w = weight_absmax(step.view, site, geometry)
                scales[-1][site] = smooth_scales(act, w, alpha)
                disp.add(act, w, scales[-1][site])
            if static:  # the smoothed input is x / s: its largest |x| over the calibration tokens
                amax.append({site: (stats.absmax(site) / self._input_scale(scales[-1], site, geometry)).amax()
                             for site in stats.sites if site in SITE_ROLES})
        meta = {"alpha": alpha, "sites": list(sites), "n_scales": sum(map(len, scales)), "static": static,
                "steps": len(step.hidden), "metrics": disp.metrics()}  # steps: forward batches per layer
        return SmoothQuantState(scales=scales, static_amax=amax, meta=meta)

    @staticmethod
    def _input_scale(layer_scales: LayerScales, site: str, geometry) -> torch.Tensor | float:
        s = layer_scales.get(site)
        if s is None:
            return 1.0
        return expand_o(s, geometry) if site == "o" else s

    @staticmethod
    def _check_static(adapter, scheme) -> None:
        from harness.errors import UnsupportedModelError
        from harness.quant.static import check_static_format

        check_static_format(getattr(scheme, "activation", None))
        if adapter.is_moe:
            raise UnsupportedModelError("smoothquant static_activations", adapter.family,
                                        "static scales are calibrated for dense linears only (not per routed expert)")

    @torch.no_grad()
    def apply(self, model, adapter, state: SmoothQuantState, scheme):
        from harness.quant import apply_scheme

        fold_scales(adapter, state.scales)
        self._metrics = dict(state.meta.get("metrics", {}))
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        if state.static_amax and scheme.activation is not None:  # (a 16-bit scheme quantizes nothing)
            self._install_static(adapter, state.static_amax, scheme)
        return model

    @staticmethod
    def _install_static(adapter, static_amax: list[LayerScales], scheme) -> None:
        """Every linear input quantized with its site's calibrated scale instead of a dynamic one."""
        from harness.quant.static import StaticQuantizer

        for view, layer_amax in zip(adapter.layers(), static_amax):
            for site, value in layer_amax.items():
                quantizer = StaticQuantizer(scheme.activation, float(value))
                for role in SITE_ROLES[site]:
                    view.site(role).act_quantizer = quantizer

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
