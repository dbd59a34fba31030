"""Per-channel smoothing (SmoothQuant, AWQ): where a scale can be folded, input statistics, folding.

A *site* is a set of weights that read the same input, plus the op in front that can absorb a
per-channel scale s: the input becomes x / s (folded into the producing op) and every reader's weight
W diag(s), so with the quantizers off the model computes the same function.

    site          input                          x / s folded into              scale shape
    qkv           attention RMSNorm output       that norm's weight             [hidden]
    mlp_in        MLP RMSNorm output             that norm's weight             [hidden]
                  (gate/up | routers, experts' fused gate_up, shared expert gate/up)
    o             attention output (per head)    v_proj rows (and bias)         [kv_heads * head_dim]
    down          act(gate) * up                 up_proj rows (dense MLP or the shared expert)   [inter]
    experts_down  act(gate_e) * up_e per expert  the up half of each expert's fused gate_up      [E, inter]

`o`: the attention output of query head h is a mix of the values of KV head h // groups, so under GQA
one scale per KV channel is shared by the query heads of its group (expanded with `expand_o`).
Routers (and Qwen2-MoE's shared-expert gate) read the normed residual too: their weights get the
scale (they stay in full precision, so that is exact) but never count as quantized readers.
Folding runs in float64 and casts back to each parameter's dtype.

A smoothing state is typed: `LayerScales` per decoder layer ({site: s}, `fold_scales`) and, for a
method that clips, `LayerClips` ({reader: max|w| per row and group}, `clip_weights`). The layer-wise
methods see a layer's site inputs through `site_input_hooks`: `SiteStats` keeps their per-channel
statistics (harness.calib.ChannelStats), `LayerCapture` the inputs and block outputs themselves.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from harness.calib import ChannelStats
from harness.errors import InvalidValueError, UnknownNameError

NORM_SITES = ("qkv", "mlp_in")  # fed by an RMSNorm (SmoothQuant's sites)
PAIR_SITES = ("o", "down", "experts_down")  # fed by a linear whose output rows absorb the scale
SITES = ("qkv", "o", "mlp_in", "down", "experts_down")  # execution order inside a layer
SITE_SETS = {"norms": NORM_SITES, "all": SITES}

#: one decoder layer's smoothing scales: site -> s (the scale shapes of the table above)
LayerScales = dict[str, torch.Tensor]
#: one decoder layer's clip values: reader ("v", "experts.down", ...) -> max|w| [out, groups] ([E, out, groups])
LayerClips = dict[str, torch.Tensor]


def site_set(name: str) -> tuple[str, ...]:
    if name not in SITE_SETS:
        raise UnknownNameError("smoothing site set", name, SITE_SETS)
    return SITE_SETS[name]


def _down_role(view) -> str | None:
    """The role of the linear reading act(gate) * up: the dense MLP's down, or the shared expert's."""
    role = "down" if view.experts is None else "shared_down"
    return role if role in view.sites else None


def layer_sites(view, wanted: tuple[str, ...] = SITES) -> list[str]:
    """The sites of `wanted` that exist in this layer, in execution order."""
    out = []
    for site in SITES:
        if site not in wanted:
            continue
        if site == "down" and not view.mlp_out:
            continue
        if site == "experts_down" and view.experts is None:
            continue
        out.append(site)
    return out


def readers(view, site: str) -> dict[str, torch.Tensor]:
    """Quantized weights that read the site's input, by short name: [out, in] or fused [E, out, in]
    (input along the last dim; `o` reads q_size channels, see `expand_o`)."""
    mlp = view.mlp_linears
    prefix = "" if view.experts is None else "shared_"
    if site == "qkv":
        return {"q": view.q.weight, "k": view.k.weight, "v": view.v.weight}
    if site == "o":
        return {"o": view.o.weight}
    if site == "mlp_in":
        out = {name: mlp[name].weight for name in (f"{prefix}gate", f"{prefix}up") if name in mlp}
        if view.experts is not None:
            out["experts.gate_up"] = view.experts.gate_up
        return out
    if site == "down":
        return {f"{prefix}down": mlp[f"{prefix}down"].weight}
    if site == "experts_down":
        return {"experts.down": view.experts.down}
    raise UnknownNameError("smoothing site", site, SITES)


def expand_o(s: torch.Tensor, geometry) -> torch.Tensor:
    """A per-KV-channel scale [kv_heads * hd] as the o_proj input scale [heads * hd]."""
    hd, kv, groups = geometry.head_dim, geometry.num_kv_heads, geometry.kv_groups
    return s.reshape(kv, 1, hd).expand(kv, groups, hd).reshape(kv * groups * hd)


def tie_o(stat: torch.Tensor, geometry, reduce: str) -> torch.Tensor:
    """A per-o-input-channel statistic [heads * hd] reduced over the query heads of each KV group."""
    hd, kv, groups = geometry.head_dim, geometry.num_kv_heads, geometry.kv_groups
    stat = stat.reshape(kv, groups, hd)
    return (stat.amax(1) if reduce == "max" else stat.mean(1)).reshape(kv * hd)


def reader_scale(site: str, s: torch.Tensor, geometry) -> torch.Tensor:
    """The site scale as a factor broadcastable over a reader weight's input columns."""
    if site == "o":
        return expand_o(s, geometry)
    if site == "experts_down":
        return s[:, None, :]  # [E, 1, I] against down [E, H, I]
    return s


def weight_absmax(view, site: str, geometry) -> torch.Tensor:
    """max |W[:, j]| over every quantized reader of the site (per expert for experts_down), in the
    site's scale shape."""
    if site == "experts_down":
        return view.experts.down.detach().abs().amax(dim=1).float()  # [E, I]
    cols = [w.detach().abs().reshape(-1, w.shape[-1]).amax(0).float() for w in readers(view, site).values()]
    out = torch.stack(cols).amax(0)
    return tie_o(out, geometry, "max") if site == "o" else out


# ---- folding ---------------------------------------------------------------------------------
@torch.no_grad()
def _scale_(t: torch.Tensor | None, factor: torch.Tensor, divide: bool = False) -> None:
    if t is None:
        return
    t64, f64 = t.detach().to(torch.float64), factor.to(device=t.device, dtype=torch.float64)
    t.copy_((t64 / f64 if divide else t64 * f64).to(t.dtype))


@torch.no_grad()
def fold_scale(view, site: str, s: torch.Tensor, geometry) -> None:
    """In place: the site's input becomes x / s, its readers' weights W diag(s) (same function)."""
    if site in NORM_SITES:
        norm = view.attn_norm if site == "qkv" else view.mlp_norm
        _scale_(norm.weight, s, divide=True)
        _scale_(getattr(norm, "bias", None), s, divide=True)
        for w in readers(view, site).values():
            _scale_(w, s)
        if site == "mlp_in":
            for router in view.router_linears:
                _scale_(router.weight, s)
        return
    if site == "o":
        _scale_(view.v.weight, s[:, None], divide=True)
        _scale_(view.v.bias, s, divide=True)
        _scale_(view.o.weight, expand_o(s, geometry))
        return
    if site == "down":
        mlp = view.mlp_linears
        prefix = "" if view.experts is None else "shared_"
        up, down = mlp[f"{prefix}up"], mlp[f"{prefix}down"]
        _scale_(up.weight, s[:, None], divide=True)
        _scale_(up.bias, s, divide=True)
        _scale_(down.weight, s)
        return
    if site == "experts_down":
        inter = view.experts.intermediate_size
        _scale_(view.experts.gate_up.data[:, inter:, :], s[:, :, None], divide=True)
        _scale_(view.experts.down, s[:, None, :])
        return
    raise UnknownNameError("smoothing site", site, SITES)


def fold_layer_scales(view, scales: LayerScales, geometry) -> int:
    """Fold one layer's scales into it, sites in execution order; returns how many were folded."""
    unknown = [site for site in scales if site not in SITES]
    if unknown:
        raise UnknownNameError("smoothing site", unknown[0], SITES)
    for site in SITES:
        if site in scales:
            fold_scale(view, site, scales[site], geometry)
    return len(scales)


def _per_layer(adapter, values: list, what: str) -> list:
    views = adapter.layers()
    if values and len(values) != len(views):
        raise InvalidValueError(f"number of layers of smoothing {what}", len(values),
                                f"{len(views)} (one per decoder layer) or 0")
    return list(zip(views, values))


def fold_scales(adapter, scales: list[LayerScales]) -> int:
    """Fold per-layer scales (one {site: s} per decoder layer, or none at all) into the model, sites
    in execution order; returns how many were folded."""
    geometry = adapter.attention
    return sum(fold_layer_scales(view, layer, geometry) for view, layer in _per_layer(adapter, scales, "scales"))


@contextmanager
def folded(view, scales: LayerScales, geometry):
    """The layer with its scales folded in (as `fold_scales` will), restored bit for bit on exit."""
    saved = {k: v.clone() for k, v in view.module.state_dict().items()}
    try:
        fold_layer_scales(view, scales, geometry)
        yield view
    finally:
        view.module.load_state_dict(saved)


def clamp_weight(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """w [..., out, in] clamped to [-m, m] per (row, group); max_val [..., out, groups] (fp32)."""
    groups = max_val.shape[-1]
    g = w.shape[-1] // groups
    wg = w.float().reshape(*w.shape[:-1], groups, g)
    m = max_val.to(wg.device)[..., None]
    return torch.clamp(wg, -m, m).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def clip_weights(adapter, clips: list[LayerClips]) -> int:
    """Clamp every reader weight that has clip values (one {reader: max|w|} per decoder layer, or none
    at all) in place; returns how many were clamped."""
    n = 0
    for view, layer in _per_layer(adapter, clips, "clip values"):
        for site in layer_sites(view, SITES):
            for name, w in readers(view, site).items():
                if name in layer:
                    w.data.copy_(clamp_weight(w.data, layer[name]))
                    n += 1
    return n


# ---- site inputs -----------------------------------------------------------------------------
def site_input_hooks(view, sites: tuple[str, ...] | list[str], callback: Callable[..., None]) -> list:
    """Forward hooks that call `callback(site, x, expert=None)` with each site's input as the layer
    runs. Experts: `experts_down` gives each expert's down input (expert=e), the pseudo-site
    `experts_in` the tokens routed to expert e. Returns the handles (remove them when done)."""
    handles = []

    def pre_hook(site):
        def hook(_module, args, kwargs):
            callback(site, args[0] if args else kwargs["hidden_states"])
        return hook

    down = _down_role(view)
    for site, role in (("qkv", "attn"), ("mlp_in", "mlp"), ("o", "o"), ("down", down)):
        if site in sites and role is not None:
            handles.append(view.site(role).register_forward_pre_hook(pre_hook(site), with_kwargs=True))
    if view.experts is not None and ("experts_down" in sites or "experts_in" in sites):
        hook = _experts_hook(callback, "experts_in" in sites, "experts_down" in sites)
        handles.append(view.site("experts").register_forward_hook(hook, with_kwargs=True))
    return handles


def _experts_hook(callback, give_in: bool, give_down: bool):
    def hook(module, args, kwargs, _out):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        for e in range(module.gate_up_proj.shape[0]):
            token = torch.where((index == e).any(-1))[0]
            if token.numel() == 0:
                continue
            x = hidden[token]
            if give_in:
                callback("experts_in", x, e)
            if not give_down:
                continue
            gate, up = nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            callback("experts_down", module.act_fn(gate) * up, e)
    return hook


class _Hooked:
    """Context manager base: `_hooks()` registers the hooks on enter, exit removes them."""

    handles: list

    def _hooks(self) -> list:
        raise NotImplementedError

    def __enter__(self):
        self.handles = self._hooks()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class SiteStats(_Hooked):
    """ChannelStats of the input of each site of one layer (per expert for experts_down), filled while
    the layer runs inside the `with` block."""

    def __init__(self, view, sites: tuple[str, ...]):
        self.view = view
        self.sites = layer_sites(view, sites)
        n = view.experts.num_experts if view.experts is not None else 0
        self.stats = {site: [ChannelStats() for _ in range(n)] if site == "experts_down" else ChannelStats()
                      for site in self.sites}

    def _hooks(self) -> list:
        def add(site, x, expert=None):
            if site in self.stats:
                entry = self.stats[site]
                (entry[expert] if expert is not None else entry).add(x)
        return site_input_hooks(self.view, self.sites, add)

    def absmax(self, site: str) -> torch.Tensor:
        """max |x_j| per channel ([E, dim] for experts_down); zeros where no token was seen."""
        dim = next(iter(readers(self.view, site).values())).shape[-1]
        entry = self.stats[site]
        if isinstance(entry, list):
            return torch.stack([e.absmax if e.absmax is not None else torch.zeros(dim) for e in entry])
        return entry.absmax if entry.absmax is not None else torch.zeros(dim)


@contextmanager
def swapped(pairs: list[tuple[nn.Parameter, torch.Tensor]]):
    """Temporarily replace parameters' data (restored on exit)."""
    old = [p.data for p, _ in pairs]
    try:
        for p, new in pairs:
            p.data = new
        yield
    finally:
        for (p, _), data in zip(pairs, old):
            p.data = data


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class LayerCapture(_Hooked):
    """What one FP decoder layer sees on the calibration batches, captured while it runs inside the
    `with` block: the attention's calls (args, kwargs) and outputs, the MLP's inputs and outputs, the
    o/down inputs, the tokens routed to each expert and each expert's down input."""

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

    def _hooks(self) -> list:
        attn, mlp = self.view.site("attn"), self.view.site("mlp")

        def attn_pre(_m, args, kwargs):
            self.attn_calls.append((args, dict(kwargs)))

        def mlp_pre(_m, args, kwargs):
            self.mlp_in.append(args[0] if args else kwargs["hidden_states"])

        def callback(site, x, expert=None):
            if site == "experts_in":
                self.experts_in[expert].append(x)
            elif site == "experts_down":
                self.experts_down[expert].append(x)
            else:
                self.inputs[site].append(x)

        return [attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
                attn.register_forward_hook(lambda _m, _a, _kw, out: self.attn_out.append(_first(out)),
                                           with_kwargs=True),
                mlp.register_forward_pre_hook(mlp_pre, with_kwargs=True),
                mlp.register_forward_hook(lambda _m, _a, _kw, out: self.mlp_out.append(_first(out)),
                                          with_kwargs=True),
                *site_input_hooks(self.view, ("o", "down", "experts_down", "experts_in"), callback)]

    def site_inputs(self, site: str, expert: int | None = None) -> torch.Tensor:
        """[tokens, channels] input of a site (of one expert for experts_down / experts_in; empty when no
        token was routed to it)."""
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

    def block_mse(self, site: str, pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> float:
        """Mean squared error of the site's block output (the attention for qkv, the MLP or sparse-MoE
        block for mlp_in) against the captured FP output, rerun with parameters' data swapped."""
        if site == "qkv":
            module, calls, refs = self.view.site("attn"), self.attn_calls, self.attn_out
        elif site == "mlp_in":
            module, calls, refs = self.view.site("mlp"), [((x,), {}) for x in self.mlp_in], self.mlp_out
        else:
            raise UnknownNameError("smoothing block", site, ("qkv", "mlp_in"))
        total, count = 0.0, 0
        with swapped(pairs):
            for (args, kw), ref in zip(calls, refs):
                out = _first(module(*args, **kw))
                total += float((out.float() - ref.float()).pow(2).sum())
                count += ref.numel()
        return total / max(count, 1)


# ---- summaries -------------------------------------------------------------------------------
def disparity(absmax: torch.Tensor) -> float:
    """Channel-range disparity of a per-channel max|x| vector: max_j / mean_j (1 = flat)."""
    a = absmax.float().reshape(-1)
    return float(a.max() / a.mean().clamp_min(1e-12))


def geomean(values: list[float]) -> float:
    """Geometric mean of the positive values (NaN when there are none)."""
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


class Disparity:
    """Channel-range disparity of what a smoothing scale acts on, before and after: per smoothed vector
    that saw tokens (each expert's own for experts_down) max_j / mean_j of the activations' max|x_j|
    (after: divided by s) and of the weights' max|W_:,j| (after: times s); `metrics()` gives their
    geometric means (`act_disparity_before`, ..., `weight_disparity_after`)."""

    def __init__(self):
        self.values: dict[str, list[float]] = {"act_before": [], "act_after": [], "weight_before": [],
                                               "weight_after": []}

    def add(self, act: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> None:
        for a_row, w_row, s_row in zip(act.reshape(-1, act.shape[-1]), weight.reshape(-1, weight.shape[-1]),
                                       s.reshape(-1, s.shape[-1])):
            if a_row.max() > 0:
                self.values["act_before"].append(disparity(a_row))
                self.values["act_after"].append(disparity(a_row / s_row))
                self.values["weight_before"].append(disparity(w_row))
                self.values["weight_after"].append(disparity(w_row * s_row))

    def metrics(self) -> dict[str, float]:
        return {f"{k.split('_')[0]}_disparity_{k.split('_')[1]}": geomean(v) for k, v in self.values.items()}
