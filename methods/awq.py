"""AWQ: Activation-aware Weight Quantization (Lin et al., MLSys 2024).

Weight-only. Decoder layer by decoder layer (inputs of layer i+1 = outputs of the FP layer i, as the
reference), for every site (harness.smoothing: q/k/v after the attention norm, o after v, gate/up
after the MLP norm, down after up; MoE: router + every expert's gate_up after the norm, each expert's
down after its own up):

1. scale search: a_j = mean|x_j| over the calibration tokens; for α in {0, 1/n, ..., (n-1)/n}
   (n_grid = 20), s = a^α (clamped at 1e-4) normalised by sqrt(max s * min s); the readers' weights
   become Q(W diag(s)) diag(s)^-1 (Q = the scheme's weight format, round to nearest) and the block
   is run on the calibration inputs: the attention module for q/k/v, the MLP (or the whole sparse-MoE
   block) for gate/up, the linear itself for o and down (per expert for experts' down; there the error
   Σ_t ||x_t ΔWᵀ||² is computed as Σ ΔW (XᵀX) ΔWᵀ, the same number at a cost independent of T). The α with
   the least output MSE against the FP block wins (α = 0 is plain RTN, so the search never loses to
   RTN on the calibration data). Every site is searched on the FP layer; then all scales are folded.
2. clip search (on the scaled weights, inputs divided by s): per output row and quantization group
   (the whole row for per-channel formats), max|w| is shrunk by 1, 0.95, ..., 0.55 (grid 20,
   max_shrink 0.5), weights clamped to [-m, m] and quantized; the m with the least MSE of the group's
   partial dot products on up to 512 strided calibration tokens wins. q and k are not clipped (as the
   reference). Routers stay in full precision: scaled (exactly) but never searched or clipped.

State (`AWQState`): per decoder layer, the scale of each site and the clip values of each clipped
reader ([out, groups], [E, out, groups] for fused experts). `apply` folds the scales, clamps the
weights and installs the scheme with RTN weights, so a cached state reproduces the calibrated model
exactly. `steps` = grid points evaluated (scale + clip).
Deviations: under GQA the v->o scale is one per KV channel, shared by the query heads of its group (the
reference skips v->o when KV heads < heads); calibration text is the harness corpus (paper: 128 x 512
Pile-val tokens); clip tokens are strided over every captured token (the reference: over one batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt, field_validator

from harness.calib import walk_layers
from harness.formats import get_format, quantize
from harness.method import CalibContext, Method, MethodParams
from harness.registry import register_method
from harness.smoothing import (
    LayerCapture,
    LayerClips,
    LayerScales,
    clamp_weight,
    clip_weights,
    fold_scales,
    folded,
    geomean,
    layer_sites,
    reader_scale,
    readers,
    site_set,
    tie_o,
)
from harness.state import State

NO_CLIP = ("q", "k")  # the reference does not clip the query/key projections


@dataclass(kw_only=True)
class AWQState(State):
    """Per decoder layer: the searched scale of each site ({site: s}) and the clip values of each
    clipped reader ({reader: max|w| per row and group}; empty without the clip search)."""

    scales: list[LayerScales] = field(default_factory=list)
    clips: list[LayerClips] = field(default_factory=list)


def _group_size(fmt, in_features: int) -> int:
    return fmt.group_size if fmt.granularity == "group" else in_features


def _fake_quant_scaled(w: torch.Tensor, factor: torch.Tensor, fmt) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1 in fp32, back in w's dtype."""
    f = factor.to(device=w.device, dtype=torch.float32)
    return (quantize(w.float() * f, fmt) / f).to(w.dtype)


def gram(x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """XᵀX [in, in] (fp32) of the rows of x [T, in], accumulated in token chunks."""
    g = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk].float()
        g += xi.T @ xi
    return g


def _output_sq_error(g: torch.Tensor, delta: torch.Tensor) -> float:
    """Σ_t ||x_t deltaᵀ||² = Σ_rows δ G δᵀ with G = XᵀX: the same number as running the tokens through
    the weight error, at a cost independent of the number of tokens."""
    delta = delta.float().to(g.device)
    return float(((delta @ g) * delta).sum())


@torch.no_grad()
def clip_search(w: torch.Tensor, x: torch.Tensor, fmt, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512) -> tuple[torch.Tensor, float, float]:
    """AWQ's per-group max-clip search for one weight w [out, in] with inputs x [T, in].

    Returns (max_val [out, groups] fp32, MSE without clipping, MSE with the chosen clip), the MSE
    being the mean over tokens, rows and groups of the squared error of each group's partial dot product.
    """
    fmt = get_format(fmt)
    out_f, in_f = w.shape
    g = _group_size(fmt, in_f)
    groups = in_f // g
    x = x.reshape(-1, in_f)
    x = x[:: max(1, x.shape[0] // n_tokens)].float()
    xg = x.reshape(x.shape[0], groups, g)
    org_max = w.float().abs().reshape(out_f, groups, g).amax(-1)  # [out, groups]
    best_val = org_max.clone()
    best_err = torch.full_like(org_max, math.inf)
    first_err = None
    tokens = x.shape[0]
    # mean_t (x_tn · d_on)² = d_on G_n d_onᵀ / T with G_n = X_nᵀ X_n per group: cheaper when g < T
    grams = torch.einsum("tng,tnh->ngh", xg, xg) if g < tokens else None
    rows = max(1, (1 << 24) // max(1, tokens * groups))  # bound the [rows, T, groups] products
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        q = quantize(clamp_weight(w, max_val), fmt).float().reshape(out_f, groups, g)
        delta = q - w.float().reshape(out_f, groups, g)
        if grams is not None:
            dn = delta.transpose(0, 1)  # [groups, out, g]
            err = ((dn @ grams) * dn).sum(-1).T / tokens
        else:
            err = torch.empty_like(org_max)
            for r in range(0, out_f, rows):
                err[r:r + rows] = torch.einsum("tng,ong->otn", xg, delta[r:r + rows]).pow(2).mean(1)
        if first_err is None:
            first_err = float(err.mean())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_val = torch.where(better, max_val, best_val)
    return best_val, first_err, float(best_err.mean())


@register_method("awq")
class AWQ(Method):
    """AWQ: per-channel activation-aware weight scaling (grid search) and weight clipping (weight-only)."""

    version = 1
    state_type = AWQState
    conformance_params = {"n_grid": 2, "clip_grid": 4, "clip_tokens": 64}

    class Params(MethodParams):
        n_grid: PositiveInt = 20  # scale exponents α = 0, 1/n_grid, ..., 1 - 1/n_grid
        sites: Literal["norms", "all"] = "all"  # norm-fed inputs only, or also v->o and up->down (paper)
        clip: bool = True  # the max-clip search after scaling
        clip_grid: PositiveInt = 20
        max_shrink: float = Field(0.5, gt=0, lt=1)  # shrink ratios 1, 1 - 1/clip_grid, ... > 1 - max_shrink
        clip_tokens: PositiveInt = 512
        batch_size: PositiveInt = 8  # calibration windows per layer forward

        @field_validator("max_shrink")
        @classmethod
        def _some_shrink_ratio(cls, v: float, info):
            if info.data.get("clip") and "clip_grid" in info.data and int(v * info.data["clip_grid"]) < 1:
                raise ValueError("the clip search needs max_shrink * clip_grid >= 1 (at least one ratio)")
            return v

    def calib_scheme_key(self, scheme: Any) -> Any:
        fmt = getattr(scheme, "weight", None)
        return {"weight": fmt.to_dict() if fmt is not None else None}

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> AWQState:
        fmt = getattr(ctx.scheme, "weight", None)
        if fmt is None:
            return AWQState(meta={"note": "scheme keeps weights in full precision; nothing to search", "steps": 0})
        fmt, p = get_format(fmt), self.params
        geometry = ctx.adapter.attention
        sites = site_set(p.sites)
        state = AWQState()
        alphas: dict[str, Any] = {}
        ratios = {"scale": [], "clip": []}
        steps = 0
        for step in walk_layers(ctx.model, ctx.adapter, ctx.calib_inputs(), p.batch_size, progress=ctx.progress,
                                desc="AWQ layers"):
            view = step.view
            with LayerCapture(view) as cap:
                step.run()  # next layer's inputs: the FP layer's outputs
            scales: LayerScales = {}
            self._evals = 0
            for site in layer_sites(view, sites):
                scales[site], alphas[f"{view.index}.{site}"], loss0, loss = self._search(view, site, cap, fmt, geometry)
                ratios["scale"] += [b / a for a, b in zip(loss0, loss) if a > 0]
            steps += self._evals
            clips: LayerClips = {}
            if p.clip:
                with folded(view, scales, geometry):  # search on the scaled weights, as `apply` folds them
                    clips, n, clip_ratios = self._clip_layer(view, cap, scales, fmt, geometry)
                steps += n
                ratios["clip"] += clip_ratios
            state.scales.append({k: v.detach().cpu().float().contiguous() for k, v in scales.items()})
            state.clips.append({k: v.detach().cpu().float().contiguous() for k, v in clips.items()})
            del cap
        metrics = {f"{k}_loss_ratio": geomean(v) for k, v in ratios.items() if v}
        flat = [a for v in alphas.values() for a in (v if isinstance(v, list) else [v])]
        metrics["mean_alpha"] = sum(flat) / len(flat) if flat else float("nan")
        state.meta = {"weight_format": fmt.to_dict(), "sites": list(sites), "alphas": alphas, "steps": steps,
                      "metrics": metrics, "n_grid": p.n_grid, "clip": p.clip}
        return state

    # ---- scale search -----------------------------------------------------------------------
    def _search(self, view, site, cap: LayerCapture, fmt, geometry):
        """(s, best α, loss at α=0 per vector, best loss per vector) for one site."""
        if site == "experts_down":
            rows, alphas, l0s, ls = [], [], [], []
            down = view.experts.down
            for e in range(view.experts.num_experts):
                x = cap.site_inputs("experts_down", e)
                if x.numel() == 0:  # no token reached this expert: leave it unscaled
                    rows.append(torch.ones(down.shape[-1]))
                    alphas.append(0.0)
                    continue
                mean = x.abs().float().mean(0).cpu()

                def loss(s, g=gram(x), n=x.shape[0], w=down.data[e]):
                    return _output_sq_error(g, w - _fake_quant_scaled(w, s, fmt)) / (n * w.shape[0])

                s, a, l0, lb = self._grid(mean, loss)
                rows.append(s)
                alphas.append(a)
                l0s.append(l0)
                ls.append(lb)
            return torch.stack(rows), alphas, l0s, ls
        x = cap.site_inputs(site)
        mean = x.abs().float().mean(0).cpu()
        if site == "o":
            mean = tie_o(mean, geometry, "mean")
        loss = self._site_loss(view, site, cap, x, fmt, geometry)
        s, a, l0, lb = self._grid(mean, loss)
        return s, a, [l0], [lb]

    def _grid(self, mean: torch.Tensor, loss):
        best = (math.inf, None, None)
        loss0 = None
        for i in range(self.params.n_grid):
            alpha = i / self.params.n_grid
            s = mean.pow(alpha).clamp(min=1e-4)
            s = (s / (s.max() * s.min()).sqrt()).float()
            value = loss(s)
            self._evals += 1
            if loss0 is None:
                loss0 = value
            if value < best[0]:
                best = (value, alpha, s)
        return best[2], best[1], loss0, best[0]

    def _site_loss(self, view, site, cap: LayerCapture, x: torch.Tensor, fmt, geometry):
        """loss(s): MSE of the site's block output with its readers quantized under scale s."""
        weights = readers(view, site)
        if site in ("o", "down"):
            (w,) = weights.values()
            g, n = gram(x), x.shape[0]

            def direct(s):
                delta = w - _fake_quant_scaled(w, reader_scale(site, s, geometry), fmt)
                return _output_sq_error(g, delta) / (n * w.shape[0])

            return direct

        def replay(s):  # the attention (qkv) or the MLP / sparse-MoE block (mlp_in) rerun
            return cap.block_mse(site, [(w, _fake_quant_scaled(w.data, reader_scale(site, s, geometry), fmt))
                                        for w in weights.values()])

        return replay

    # ---- clip search --------------------------------------------------------------------------
    def _clip_layer(self, view, cap: LayerCapture, scales: dict, fmt, geometry):
        """Clip values for every quantized reader of the (already scaled) layer except q and k."""
        p = self.params
        out: LayerClips = {}
        steps, ratios = 0, []
        per_search = int(p.max_shrink * p.clip_grid)

        def search(w, x):
            nonlocal steps
            steps += per_search
            m, e0, e1 = clip_search(w, x, fmt, p.clip_grid, p.max_shrink, p.clip_tokens)
            if e0 > 0:
                ratios.append(e1 / e0)
            return m

        for site in layer_sites(view):
            s = scales.get(site)
            for name, w in readers(view, site).items():
                if name in NO_CLIP:
                    continue
                if w.dim() == 2:
                    x = cap.site_inputs(site)
                    if s is not None:
                        x = x.float() / reader_scale(site, s, geometry).to(x.device)
                    out[name] = search(w.data, x)
                    continue
                # fused experts: each expert with the tokens routed to it
                source = "experts_in" if site == "mlp_in" else "experts_down"
                rows = []
                for e in range(w.shape[0]):
                    x = cap.site_inputs(source, e)
                    if x.numel() == 0:
                        g = _group_size(fmt, w.shape[-1])
                        rows.append(w.data[e].float().abs().reshape(w.shape[1], -1, g).amax(-1))
                        continue
                    if s is not None:
                        x = x.float() / (s if site == "mlp_in" else s[e]).to(x.device)
                    rows.append(search(w.data[e], x))
                out[name] = torch.stack(rows)
        return out, steps, ratios

    # ---- apply -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model, adapter, state: AWQState, scheme):
        from harness.quant import apply_scheme

        fold_scales(adapter, state.scales)
        clip_weights(adapter, state.clips)
        self._metrics = dict(state.meta.get("metrics", {}))
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
