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

State: `scale.{layer}.{site}` and `clip.{layer}.{reader}` ([out, groups], [E, out, groups] for fused
experts). `apply` folds the scales, clamps the weights and installs the scheme with RTN weights, so a
cached state reproduces the calibrated model exactly. `steps` = grid points evaluated (scale + clip).
Deviations: under GQA the v->o scale is one per KV channel, shared by the query heads of its group (the
reference skips v->o when KV heads < heads); calibration text is the harness corpus (paper: 128 x 512
Pile-val tokens); clip tokens are strided over every captured token (the reference: over one batch).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from harness.formats import get_format, quantize
from harness.method import CalibContext, Method, MethodParams, State
from harness.registry import register_method
from harness.smoothing import (
    SITES,
    fold_scale,
    fold_scales,
    layer_sites,
    reader_scale,
    readers,
    scale_key,
    site_input_hooks,
    site_set,
    tie_o,
)

NO_CLIP = ("q", "k")  # the reference does not clip the query/key projections


def clip_key(layer: int, reader: str) -> str:
    return f"clip.{layer}.{reader}"


def clamp_weight(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """w [..., out, in] clamped to [-m, m] per (row, group); max_val [..., out, groups] (fp32)."""
    groups = max_val.shape[-1]
    g = w.shape[-1] // groups
    wg = w.float().reshape(*w.shape[:-1], groups, g)
    m = max_val.to(wg.device)[..., None]
    return torch.clamp(wg, -m, m).reshape(w.shape).to(w.dtype)


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


@contextmanager
def _swapped(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]):
    """Temporarily replace parameters' data (restored on exit)."""
    old = [p.data for p, _ in pairs]
    try:
        for p, new in pairs:
            p.data = new
        yield
    finally:
        for (p, _), data in zip(pairs, old):
            p.data = data


class _LayerCapture:
    """What one FP decoder layer sees on the calibration batches: the attention's and the MLP's
    inputs (attention: with its kwargs) and outputs, o/down inputs, the tokens routed to each expert
    and each expert's down input."""

    def __init__(self, view):
        self.view = view
        self.attn_calls: list[tuple[tuple, dict]] = []
        self.attn_out: list[torch.Tensor] = []
        self.mlp_in: list[torch.Tensor] = []
        self.mlp_out: list[torch.Tensor] = []
        self.inputs: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
        n = view.experts.num_experts if view.experts is not None else 0
        self.experts_in: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.experts_down: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.handles: list = []

    def __enter__(self) -> _LayerCapture:
        view = self.view

        def attn_pre(_m, args, kwargs):
            self.attn_calls.append((args, dict(kwargs)))

        def attn_post(_m, _args, _kwargs, out):
            self.attn_out.append(out[0] if isinstance(out, tuple) else out)

        def mlp_pre(_m, args, kwargs):
            self.mlp_in.append(args[0] if args else kwargs["hidden_states"])

        def mlp_post(_m, _args, _kwargs, out):
            self.mlp_out.append(out[0] if isinstance(out, tuple) else out)

        def callback(site, x, expert=None):
            if site == "experts_in":
                self.experts_in[expert].append(x)
            elif site == "experts_down":
                self.experts_down[expert].append(x)
            else:
                self.inputs[site].append(x)

        self.handles = [view.attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
                        view.attn.register_forward_hook(attn_post, with_kwargs=True),
                        view.mlp.register_forward_pre_hook(mlp_pre, with_kwargs=True),
                        view.mlp.register_forward_hook(mlp_post, with_kwargs=True)]
        self.handles += site_input_hooks(view, ("o", "down", "experts_down", "experts_in"), callback)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def site_inputs(self, site: str, expert: int | None = None) -> torch.Tensor:
        """[tokens, channels] input of a site (of one expert for experts_down / experts_in)."""
        if site == "qkv":
            parts = [args[0] if args else kw["hidden_states"] for args, kw in self.attn_calls]
        elif site == "mlp_in":
            parts = self.mlp_in
        elif site in ("experts_down", "experts_in"):
            parts = (self.experts_down if site == "experts_down" else self.experts_in)[expert]
            if not parts:
                return torch.empty(0)
        else:
            parts = self.inputs[site]
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])


@register_method("awq")
class AWQ(Method):
    """AWQ: per-channel activation-aware weight scaling (grid search) and weight clipping (weight-only)."""

    version = 1

    class Params(MethodParams):
        n_grid: PositiveInt = 20  # scale exponents α = 0, 1/n_grid, ..., 1 - 1/n_grid
        sites: Literal["norms", "all"] = "all"  # norm-fed inputs only, or also v->o and up->down (paper)
        clip: bool = True  # the max-clip search after scaling
        clip_grid: PositiveInt = 20
        max_shrink: float = Field(0.5, ge=0, lt=1)  # shrink ratios 1, 1 - 1/clip_grid, ... > 1 - max_shrink
        clip_tokens: PositiveInt = 512
        batch_size: PositiveInt = 8  # calibration windows per layer forward

    def calib_scheme_key(self, scheme: Any) -> Any:
        fmt = getattr(scheme, "weight", None)
        return {"weight": fmt.to_dict() if fmt is not None else None}

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> State:
        from harness.gptq import capture_layer_inputs, layer_kwargs, run_layer

        fmt = getattr(ctx.scheme, "weight", None)
        if fmt is None:
            return State(meta={"note": "scheme keeps weights in full precision; nothing to search", "steps": 0})
        fmt = get_format(fmt)
        p = self.params
        model, adapter = ctx.model, ctx.adapter
        geometry = adapter.attention
        sites = site_set(p.sites)
        inputs = ctx.calib_inputs()
        progress = ctx.progress or (lambda it, **_: it)
        layers = adapter.layers()
        first = capture_layer_inputs(model, layers[0].module, inputs, p.batch_size)
        hidden = [x for x, _ in first]
        kwargs_per_layer = layer_kwargs(model, layers, inputs, p.batch_size, first)
        del first

        tensors: dict[str, torch.Tensor] = {}
        alphas: dict[str, Any] = {}
        ratios = {"scale": [], "clip": []}
        steps = 0
        for view, kwargs in zip(progress(layers, desc="AWQ layers"), kwargs_per_layer):
            with _LayerCapture(view) as cap:
                hidden = run_layer(view.module, hidden, kwargs)  # next layer's inputs: FP outputs
            scales = {}
            self._evals = 0
            for site in layer_sites(view, sites):
                s, best_alpha, loss0, loss = self._search(view, site, cap, fmt, geometry)
                scales[site] = s
                tensors[scale_key(view.index, site)] = s
                alphas[f"{view.index}.{site}"] = best_alpha
                ratios["scale"] += [b / a for a, b in zip(loss0, loss) if a > 0]
            steps += self._evals
            if p.clip:
                saved = {k: v.clone() for k, v in view.module.state_dict().items()}
                for site in SITES:  # fold as `apply` will (same order), search on the real scaled weights
                    if site in scales:
                        fold_scale(view, site, scales[site], geometry)
                clips, n, clip_ratios = self._clip_layer(view, cap, scales, fmt, geometry)
                view.module.load_state_dict(saved)
                tensors.update(clips)
                steps += n
                ratios["clip"] += clip_ratios
            del cap
        metrics = {f"{k}_loss_ratio": _geomean(v) for k, v in ratios.items() if v}
        flat = [a for v in alphas.values() for a in (v if isinstance(v, list) else [v])]
        metrics["mean_alpha"] = sum(flat) / len(flat) if flat else float("nan")
        meta = {"weight_format": fmt.to_dict(), "sites": list(sites), "alphas": alphas, "steps": steps,
                "metrics": metrics, "n_grid": p.n_grid, "clip": p.clip}
        return State(tensors={k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, meta=meta)

    # ---- scale search -----------------------------------------------------------------------
    def _search(self, view, site, cap: _LayerCapture, fmt, geometry):
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

    def _site_loss(self, view, site, cap: _LayerCapture, x: torch.Tensor, fmt, geometry):
        """loss(s): MSE of the site's block output with its readers quantized under scale s."""
        weights = readers(view, site)
        if site in ("o", "down"):
            (w,) = weights.values()
            g, n = gram(x), x.shape[0]

            def direct(s):
                delta = w - _fake_quant_scaled(w, reader_scale(site, s, geometry), fmt)
                return _output_sq_error(g, delta) / (n * w.shape[0])

            return direct
        params = list(weights.values())
        if site == "qkv":
            calls, refs = cap.attn_calls, cap.attn_out
            module = view.attn
        else:
            calls, refs = [((xi,), {}) for xi in cap.mlp_in], cap.mlp_out
            module = view.mlp

        def replay(s):
            pairs = [(w, _fake_quant_scaled(w.data, reader_scale(site, s, geometry), fmt)) for w in params]
            total, count = 0.0, 0
            with _swapped(pairs):
                for (args, kw), ref in zip(calls, refs):
                    out = module(*args, **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    total += float((out.float() - ref.float()).pow(2).sum())
                    count += ref.numel()
            return total / max(count, 1)

        return replay

    # ---- clip search --------------------------------------------------------------------------
    def _clip_layer(self, view, cap: _LayerCapture, scales: dict, fmt, geometry):
        """Clip values for every quantized reader of the (already scaled) layer except q and k."""
        p = self.params
        out: dict[str, torch.Tensor] = {}
        steps, ratios = 0, []
        per_search = int(p.max_shrink * p.clip_grid)

        def search(w, x):
            nonlocal steps
            steps += per_search
            m, e0, e1 = clip_search(w, x, fmt, p.clip_grid, p.max_shrink, p.clip_tokens)
            if e0 > 0:
                ratios.append(e1 / e0)
            return m

        for site in layer_sites(view, SITES):
            s = scales.get(site)
            for name, w in readers(view, site).items():
                if name in NO_CLIP:
                    continue
                if w.dim() == 2:
                    x = cap.site_inputs(site)
                    if s is not None:
                        x = x.float() / reader_scale(site, s, geometry).to(x.device)
                    out[clip_key(view.index, name)] = search(w.data, x)
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
                out[clip_key(view.index, name)] = torch.stack(rows)
        return out, steps, ratios

    # ---- apply -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import apply_scheme

        fold_scales(adapter, state.tensors)
        for view in adapter.layers():
            for site in layer_sites(view, SITES):
                for name, w in readers(view, site).items():
                    m = state.tensors.get(clip_key(view.index, name))
                    if m is not None:
                        w.data.copy_(clamp_weight(w.data, m))
        self._metrics = dict(state.meta.get("metrics", {}))
        apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))


def _geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
