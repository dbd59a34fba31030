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
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harness.errors import UnknownNameError

NORM_SITES = ("qkv", "mlp_in")  # fed by an RMSNorm (SmoothQuant's sites)
PAIR_SITES = ("o", "down", "experts_down")  # fed by a linear whose output rows absorb the scale
SITES = ("qkv", "o", "mlp_in", "down", "experts_down")  # execution order inside a layer
SITE_SETS = {"norms": NORM_SITES, "all": SITES}


def site_set(name: str) -> tuple[str, ...]:
    if name not in SITE_SETS:
        raise UnknownNameError("smoothing site set", name, SITE_SETS)
    return SITE_SETS[name]


def _module(view, linear: nn.Linear) -> nn.Module:
    """The module whose forward runs for `linear` (its QuantLinear wrapper if it has one)."""
    for module in view.module.modules():
        if getattr(module, "linear", None) is linear:
            return module
    return linear


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


def scale_key(layer: int, site: str) -> str:
    return f"scale.{layer}.{site}"


def fold_scales(adapter, tensors: dict[str, torch.Tensor]) -> int:
    """Fold every `scale.{layer}.{site}` tensor of a state into the model, sites in execution order;
    returns how many were folded."""
    geometry = adapter.attention
    n = 0
    for view in adapter.layers():
        for site in SITES:
            s = tensors.get(scale_key(view.index, site))
            if s is not None:
                fold_scale(view, site, s, geometry)
                n += 1
    return n


# ---- input statistics ------------------------------------------------------------------------
class ChannelStats:
    """Running per-channel max|x| and mean|x| over the tokens seen (channels = last dim)."""

    def __init__(self):
        self.absmax: torch.Tensor | None = None
        self.abssum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        a = x.abs().float()
        m, s = a.amax(0).cpu(), a.sum(0, dtype=torch.float64).cpu()
        if self.absmax is None:
            self.absmax, self.abssum = m, s
        else:
            self.absmax, self.abssum = torch.maximum(self.absmax, m), self.abssum + s
        self.count += x.shape[0]

    @property
    def absmean(self) -> torch.Tensor | None:
        return None if self.abssum is None else (self.abssum / max(self.count, 1)).float()


def site_input_hooks(view, sites: tuple[str, ...] | list[str], callback: Callable[..., None]) -> list:
    """Forward hooks that call `callback(site, x, expert=None)` with each site's input as the layer
    runs. Experts: `experts_down` gives each expert's down input (expert=e), the pseudo-site
    `experts_in` the tokens routed to expert e. Returns the handles (remove them when done)."""
    handles = []

    def pre_hook(site):
        def hook(_module, args, kwargs):
            callback(site, args[0] if args else kwargs["hidden_states"])
        return hook

    if "qkv" in sites:
        handles.append(view.attn.register_forward_pre_hook(pre_hook("qkv"), with_kwargs=True))
    if "mlp_in" in sites:
        handles.append(view.mlp.register_forward_pre_hook(pre_hook("mlp_in"), with_kwargs=True))
    if "o" in sites:
        handles.append(_module(view, view.o).register_forward_pre_hook(pre_hook("o"), with_kwargs=True))
    if "down" in sites and view.mlp_out:
        handles.append(_module(view, view.mlp_out[0]).register_forward_pre_hook(pre_hook("down"), with_kwargs=True))
    if view.experts is not None and ("experts_down" in sites or "experts_in" in sites):
        hook = _experts_hook(callback, "experts_in" in sites, "experts_down" in sites)
        handles.append(view.experts.module.register_forward_hook(hook, with_kwargs=True))
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


class SiteStats:
    """ChannelStats of every site of every layer (per expert for experts_down)."""

    def __init__(self, adapter, sites: tuple[str, ...]):
        self.adapter = adapter
        self.sites = sites
        self.stats: dict[tuple[int, str], ChannelStats | list[ChannelStats]] = {}
        self.handles: list = []

    def __enter__(self) -> SiteStats:
        for view in self.adapter.layers():
            wanted = layer_sites(view, self.sites)
            for site in wanted:
                n = view.experts.num_experts if site == "experts_down" else 0
                self.stats[(view.index, site)] = [ChannelStats() for _ in range(n)] if n else ChannelStats()

            def callback(site, x, expert=None, index=view.index, wanted=tuple(wanted)):
                if site not in wanted:
                    return
                entry = self.stats[(index, site)]
                (entry[expert] if expert is not None else entry).add(x)

            self.handles += site_input_hooks(view, wanted, callback)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def absmax(self, layer: int, site: str, dim: int) -> torch.Tensor:
        """max |x_j| per channel ([E, dim] for experts_down); zeros where no token was seen."""
        entry = self.stats[(layer, site)]
        if isinstance(entry, list):
            return torch.stack([e.absmax if e.absmax is not None else torch.zeros(dim) for e in entry])
        return entry.absmax if entry.absmax is not None else torch.zeros(dim)


@torch.no_grad()
def run_calibration(model: nn.Module, inputs: torch.Tensor, batch_size: int = 8, progress=None) -> int:
    """Forward the calibration windows through the model (hooks do the work); returns the batches run."""
    device = next(model.parameters()).device
    starts = range(0, inputs.shape[0], batch_size)
    if progress is not None:
        starts = progress(starts, desc="calibration forward")
    n = 0
    for i in starts:
        model(inputs[i:i + batch_size].to(device), use_cache=False)
        n += 1
    return n


def disparity(absmax: torch.Tensor) -> float:
    """Channel-range disparity of a per-channel max|x| vector: max_j / mean_j (1 = flat)."""
    a = absmax.float().reshape(-1)
    return float(a.max() / a.mean().clamp_min(1e-12))
