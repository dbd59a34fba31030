"""Training-time plumbing of the learned-affine methods (FlatQuant, OSTQuant).

* FlatQuant trains one decoder layer at a time: `layerwise_training_copy` makes the fp32 work model
  (every linear and the fused experts wrapped, attention routed through the KV wrapper);
  `site_input_maxima` taps each site's input for the diagonal's init while the FP outputs are computed;
  `AffineLayerTrainer` installs the training-time sites (online transform + activation fake-quant with a
  learnable clip) on one layer and runs it with every weight a differentiable function of the site
  transforms (then fake-quantized with its learnable clip), via torch.func.functional_call.
* OSTQuant trains on the whole model: `OSTTrainingModel` is a copy whose weights are differentiable
  functions of R1, the per-layer R2s and the per-channel scalings.

Both methods' algorithms (inits, objectives, optimisers) stay in methods/; nothing here draws a random number.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness.affine import KroneckerAffine, balanced_factors, clipped_fake_quant, site_linears, weight_roles
from harness.calib import AbsMax, StatsTap
from harness.errors import InvalidValueError
from harness.kv import KVPolicy
from harness.quant import set_kv_format, ste_quantize, straight_through
from harness.rotation.fuse import OnlineTransform
from harness.transforms import hadamard_transform

# ---- FlatQuant: one layer at a time ------------------------------------------------------------------------


def layerwise_training_copy(model: nn.Module, kv: bool):
    """(fp32 copy of `model` without gradients, its adapter): every linear and fused experts module wrapped
    for quantized execution; with `kv`, attention routed through the KV wrapper (inactive until set)."""
    from harness.models import get_adapter
    from harness.quant import install_kv_quant, wrap_layer

    work = copy.deepcopy(model).float().requires_grad_(False)
    adapter = get_adapter(work)
    for view in adapter.layers():
        wrap_layer(view)
    if kv:
        install_kv_quant(work, [], None)
    return work, adapter


def layerwise_metrics(records: list[dict], steps: int, seconds: float) -> dict[str, float]:
    """Run metrics of a layer-wise training from its per-layer records ("mse_init", "mse_final")."""
    first_mse = [r["mse_init"] for r in records]
    last_mse = [r["mse_final"] for r in records]
    return {"mse_init": sum(first_mse) / len(first_mse), "mse_final": sum(last_mse) / len(last_mse),
            "mse_ratio": sum(b / a for a, b in zip(first_mse, last_mse) if a > 0) / len(records),
            "steps": float(steps), "transform_seconds": round(seconds, 3)}


def site_sizes(view, adapter, o_transform: bool) -> dict[str, int]:
    """Size of the activation at each transform site of a layer (see harness.affine.AffineTransforms)."""
    g = adapter.attention
    sizes = {"qkv": adapter.hidden_size, "mlp": adapter.hidden_size}
    if o_transform:
        sizes["o"] = g.num_heads * g.head_dim
    if view.dense_mlp is not None:
        sizes["down"] = view.mlp_out[0].in_features
    if view.experts is not None:
        sizes["experts_down"] = view.experts.intermediate_size
    return sizes


def site_factor_sizes(site: str, n: int, adapter) -> tuple[int, int]:
    """(n1, n2) of a site's Kronecker factors: heads x head_dim at "o", else the most balanced split."""
    g = adapter.attention
    return (g.num_heads, g.head_dim) if site == "o" else balanced_factors(n)


#: per site, the weights reading its input (their column maxima enter the diagonal's init)
SITE_READERS = {"qkv": ("q", "k", "v"), "o": ("o",),
                "mlp": ("gate", "up", "shared_gate", "shared_up", "experts.gate_up"),
                "down": ("down", "shared_down"), "experts_down": ("experts.down",)}


def site_readers(view) -> dict[str, list[torch.Tensor]]:
    weights = weight_roles(view)
    return {site: [weights[r] for r in roles if r in weights] for site, roles in SITE_READERS.items()}


def clear_layer(view) -> None:
    """No input transform and no activation format on any site of the layer (FP execution)."""
    for modules in site_linears(view).values():
        for m in modules:
            m.input_transform = None
            m.act_format = None
    if view.experts is not None:
        e = view.experts.module
        e.input_transform, e.down_transform, e.act_format = None, None, None


@contextlib.contextmanager
def site_input_maxima(view):
    """Inside the block, the layer's runs record the per-channel max |x| of each site's input:
    yields {site: AbsMax} ("qkv", "mlp", "down", "experts_down"; `.amax` None for an absent site)."""
    stats = {site: AbsMax() for site in ("qkv", "mlp", "down", "experts_down")}
    wrappers = site_linears(view)
    wrappers["qkv"][0].input_transform = StatsTap(stats["qkv"])
    if wrappers["mlp"]:
        wrappers["mlp"][0].input_transform = StatsTap(stats["mlp"])
    elif view.experts is not None:
        view.experts.module.input_transform = StatsTap(stats["mlp"])
    if wrappers["down"]:
        wrappers["down"][0].input_transform = StatsTap(stats["down"])
    if view.experts is not None:
        view.experts.module.down_transform = StatsTap(stats["experts_down"])
    try:
        yield stats
    finally:
        clear_layer(view)


class TrainSite(nn.Module):
    """Training-time site: the online part of the transform, then fake quantization with the learnable
    activation clip (straight-through). q/k/v (gate/up) pass the same tensor: computed once per forward."""

    def __init__(self, transform: nn.Module, fmt, clip: nn.Parameter | None):
        super().__init__()
        self.transform, self.fmt, self.clip = transform, fmt, clip
        self._last = None

    def forward(self, x):
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        y = self.transform.act(x)
        if self.fmt is not None:
            y = clipped_fake_quant(y, self.fmt, torch.sigmoid(self.clip) if self.clip is not None else None)
        self._last = (x, y)
        return y


class _Identity(nn.Module):
    def act(self, x):
        return x


def _layer_out(layer, x, kw, params=None):
    out = layer(x, **kw) if params is None else torch.func.functional_call(layer, params, (x,), kw, strict=False)
    return out[0] if isinstance(out, tuple) else out


class AffineLayerTrainer:
    """One decoder layer of the work model with trainable site transforms and clips installed.

    `sites`: {site: KroneckerAffine}; `act_clips`: {site: θ} (ratio sigmoid(θ); a MoE layer's experts use
    the "mlp" one); `weight_clips`: {weight role: θ per output channel}. `forward(x, kw)` runs the layer with
    every weight W T⁻ᵀ of the current transforms (fake-quantized as `weight_format` with its clip);
    `clear()` leaves the layer as it was (FP, no transforms)."""

    def __init__(self, view, head_dim: int, sites: dict[str, KroneckerAffine], act_format,
                 act_clips: dict[str, nn.Parameter], weight_format, weight_clips: dict[str, nn.Parameter],
                 kv_format=None, qk: torch.Tensor | None = None):
        if isinstance(kv_format, KVPolicy):  # its quantizer has no straight-through mode
            raise InvalidValueError("KV scheme for layer-wise training", kv_format.to_dict(),
                                    "a plain KV format (a KV policy is evaluated, not trained through)")
        self.view, self.hd, self.sites = view, head_dim, sites
        self.kv_format, self.qk = kv_format, qk
        self.afmt, self.clips, self.wfmt, self.lwc = act_format, act_clips, weight_format, weight_clips
        names = {id(param): n for n, param in view.module.named_parameters()}
        self.base = {role: (names[id(w)], w.detach().clone().float()) for role, w in weight_roles(view).items()}
        v = view.v
        self.v_bias = (names[id(v.bias)], v.bias.detach().clone().float()) if v.bias is not None else None
        up = view.mlp_in[1] if len(view.mlp_in) == 2 else None
        has_up_bias = up is not None and up.bias is not None
        self.up_bias = (names[id(up.bias)], up.bias.detach().clone().float()) if has_up_bias else None
        self.train_sites: list[TrainSite] = []
        self._install()

    def _install(self):
        wrappers = site_linears(self.view)
        experts = self.view.experts.module if self.view.experts is not None else None
        for site in ("qkv", "o", "mlp", "down"):
            t = self.sites.get(site)
            if t is None:
                continue
            ts = TrainSite(t, self.afmt, self.clips.get(site))
            self.train_sites.append(ts)
            for w in wrappers[site]:
                w.input_transform, w.act_format = ts, None
            if site == "mlp" and experts is not None:
                experts.input_transform = ts
        if experts is not None:
            experts.act_format = None
            if experts.input_transform is None and self.afmt is not None:  # no mlp transform: quantize only
                experts.input_transform = TrainSite(_Identity(), self.afmt, self.clips.get("mlp"))
                self.train_sites.append(experts.input_transform)
            t = self.sites.get("experts_down")
            experts.down_transform = TrainSite(t if t is not None else _Identity(), self.afmt, self.clips.get("mlp"))
            self.train_sites.append(experts.down_transform)
        for mods in wrappers.values():  # readers of sites without a transform still quantize their input
            for w in mods:
                if w.input_transform is None and self.afmt is not None:
                    w.input_transform = TrainSite(_Identity(), self.afmt, None)
                    self.train_sites.append(w.input_transform)
        if self.kv_format is not None or self.qk is not None:  # the KV cache in the loop (plain fake-quant)
            set_kv_format(self.view.attn, self.kv_format)
            if self.qk is not None:
                q32 = self.qk.float().to(self.view.q.weight.device)
                self.view.attn.qk_rotation = OnlineTransform(apply_fn=lambda x, q=q32: x @ q, name="R3")

    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(transform parameters, clip parameters: activation clips then weight clips)."""
        trans = [q for t in self.sites.values() for q in t.parameters()]
        return trans, list(self.clips.values()) + list(self.lwc.values())

    def weights(self) -> dict[str, torch.Tensor]:
        """Layer parameters as functions of the transforms (then fake-quantized with the LWC clips)."""
        hd = self.hd
        qkv, o, mlp, down, edown = (self.sites.get(s) for s in ("qkv", "o", "mlp", "down", "experts_down"))
        out = {}
        for role, (name, w) in self.base.items():
            if role in ("q", "k", "v"):
                w = qkv.weight(w) if qkv is not None else w
                if role == "v" and o is not None:  # values in the head_dim factor's basis: rows P2ᵀ W_h
                    p2 = o.f2.matrix()
                    w = torch.einsum("ji,hjk->hik", p2, w.reshape(-1, hd, w.shape[-1])).reshape(w.shape)
            elif role == "o":
                w = o.weight(w) if o is not None else w
            elif role in ("gate", "up", "shared_gate", "shared_up"):
                w = mlp.weight(w) if mlp is not None else w
                if role.endswith("up") and down is not None and down.diag is not None:
                    w = w * down.diag.unsqueeze(-1)
            elif role in ("down", "shared_down"):
                w = down.weight(w) if down is not None else w
            elif role == "experts.gate_up":
                w = mlp.weight(w) if mlp is not None else w
                if edown is not None and edown.diag is not None:
                    inter = self.view.experts.intermediate_size
                    w = torch.cat([w[:, :inter], w[:, inter:] * edown.diag.unsqueeze(-1)], dim=1)
            elif role == "experts.down":
                w = edown.weight(w) if edown is not None else w
            if self.wfmt is not None:
                w = clipped_fake_quant(w, self.wfmt, torch.sigmoid(self.lwc[role]) if role in self.lwc else None)
            out[name] = w
        if self.v_bias is not None and o is not None:
            name, b = self.v_bias
            out[name] = (b.reshape(-1, hd) @ o.f2.matrix()).reshape(-1)
        if self.up_bias is not None and down is not None and down.diag is not None:
            name, b = self.up_bias
            out[name] = b * down.diag
        return out

    def forward(self, x, kw):
        try:
            return _layer_out(self.view.module, x, kw, self.weights())
        finally:
            for s in self.train_sites:
                s._last = None

    @torch.no_grad()
    def mse(self, hidden, kwargs, targets) -> float:
        """Mean squared error of the layer's outputs against `targets` over every batch."""
        total, count = 0.0, 0
        for x, kw, y in zip(hidden, kwargs, targets):
            total += float(F.mse_loss(self.forward(x, kw), y, reduction="sum"))
            count += y.numel()
        return total / count

    def export(self):
        """({site: SiteTransform}, {site: activation clip ratio}, {role: weight clip ratios, float64})."""
        sites = {s: t.export() for s, t in self.sites.items()}
        clips = {s: float(torch.sigmoid(c.detach()).to(torch.float64)) for s, c in self.clips.items()}
        lwc = {r: torch.sigmoid(c.detach()).to(torch.float64) for r, c in self.lwc.items()}
        return sites, clips, lwc

    def clear(self):
        """Leave the work model's layer as it was (FP, no transforms), for memory."""
        set_kv_format(self.view.attn, None)
        self.view.attn.qk_rotation = None
        clear_layer(self.view)
        self.train_sites, self.sites = [], {}


# ---- OSTQuant: the whole model ------------------------------------------------------------------------------


def qk_row_scale(s_qk: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """OSTQuant's S_qk [kv_heads, hd / 2] as per-row factors of k_proj (`repeat` 1) or q_proj (`repeat` =
    query heads per KV head): each value covers a RoPE pair (i, i + hd/2), so the scaling commutes with RoPE
    and cancels in q·k."""
    per_head = torch.cat([s_qk, s_qk], dim=-1)  # [kv_heads, hd]
    return per_head.repeat_interleave(repeat, dim=0).reshape(-1)


class OSTTrainingModel:
    """A copy of the model whose transformed weights are differentiable functions of R1, the R2s and the
    scalings. Norms folded, R3/R4 and the scheme's activation / KV quantizers installed (straight-through
    during `logits`); weights in full precision unless `weight_format` (then STE-quantized after the
    transforms). Scalings per layer: "attn" / "mlp" (norm -> readers), "qk" [kv_heads, hd / 2] (k rows x s,
    q rows / s), "ov" [kv_heads, hd] (v -> o),
    "ud" (up -> down), "eud" [E, I] (per routed expert)."""

    def __init__(self, model, scheme, qk: torch.Tensor | None, weight_format=None):
        from harness.models import get_adapter
        from harness.quant import apply_scheme, get_scheme
        from harness.rotation.install import Rotations, fold_norms, install_rotations

        scheme = get_scheme(scheme)
        if scheme.embeddings:
            raise InvalidValueError("scheme for ostquant training", scheme.name, "one that keeps embeddings in FP")
        get_adapter(model).require_direct_residual_writers("ostquant")
        self.model = copy.deepcopy(model)
        adapter = get_adapter(self.model)
        fold_norms(adapter)
        g = adapter.attention
        self.hd, self.kv_groups = g.head_dim, g.kv_groups
        self.weight_format = weight_format
        self.head_quantized = bool(scheme.lm_head)
        sites = []  # (parameter, role, layer); base values taken now: after the norm folding, before R4
        for view in adapter.layers():
            i = view.index
            sites += [(view.q.weight, "q", i), (view.k.weight, "k", i), (view.v.weight, "v", i),
                      (view.o.weight, "o", i), (view.attn_norm.weight, "attn_norm", i),
                      (view.mlp_norm.weight, "mlp_norm", i)]
            if view.v.bias is not None:
                sites.append((view.v.bias, "v_bias", i))
            sites += [(lin.bias, f"{name}_bias", i) for name, lin in (("q", view.q), ("k", view.k)) if lin.bias is not None]
            sites += [(lin.bias, "out_bias", i) for lin in (view.o, *view.mlp_out) if lin.bias is not None]
            sites += [(m.weight, "router", i) for m in view.router_linears]
            if view.dense_mlp is not None:
                gate, up = view.mlp_in
                sites += [(gate.weight, "gate", i), (up.weight, "up", i), (view.mlp_out[0].weight, "down", i)]
                if up.bias is not None:
                    sites.append((up.bias, "up_bias", i))
            if view.experts is not None:
                sites += [(view.experts.gate_up, "e_gate_up", i), (view.experts.down, "e_down", i)]
        if self.head_quantized:
            sites.append((adapter.lm_head.weight, "head", -1))
        base = [(p, p.detach().clone(), role, i) for p, role, i in sites]
        install_rotations(self.model, adapter, Rotations(qk=qk, down_kind="hadamard"))
        apply_scheme(self.model, adapter, scheme, quantize_weights=False)
        self.model.requires_grad_(False)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.sites = [(names[id(p)], w, role, i) for p, w, role, i in base]
        self.current = None
        adapter.embed.register_forward_hook(lambda _m, _a, out: out @ self.current.to(out.dtype))
        if not self.head_quantized:
            adapter.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] @ self.current.T.to(args[0].dtype),))

    def _param(self, w, role, r1, r2, s):
        if role == "attn_norm":
            return w / s["attn"] if "attn" in s else w
        if role == "mlp_norm":
            return w / s["mlp"] if "mlp" in s else w
        if role == "out_bias":
            return w @ r1
        if role in ("q_bias", "k_bias"):  # follow S_qk's rows (R1 acts on the input side only)
            if "qk" not in s:
                return w
            rows = qk_row_scale(s["qk"], self.kv_groups if role == "q_bias" else 1)
            return w * rows if role == "k_bias" else w / rows
        if role == "v_bias":
            b = w.reshape(-1, self.hd) @ r2
            return (b / s["ov"] if "ov" in s else b).reshape(-1)
        if role == "up_bias":
            return w / s["ud"] if "ud" in s else w
        if role in ("q", "k", "v", "gate", "up", "router", "e_gate_up", "head"):
            out = w @ r1
            key = "attn" if role in ("q", "k", "v") else None if role == "head" else "mlp"
            if key in s:
                out = out * s[key]
            if role in ("q", "k") and "qk" in s:  # S_qk: k rows x s, q rows / s (RoPE pairs share s)
                rows = qk_row_scale(s["qk"], self.kv_groups if role == "q" else 1)
                out = out * rows.unsqueeze(-1) if role == "k" else out / rows.unsqueeze(-1)
            if role == "v":
                out = torch.einsum("ji,hjk->hik", r2, out.reshape(-1, self.hd, out.shape[-1]))
                out = (out / s["ov"].unsqueeze(-1) if "ov" in s else out).reshape(w.shape)
            elif role == "up" and "ud" in s:
                out = out / s["ud"].unsqueeze(-1)
            elif role == "e_gate_up" and "eud" in s:
                inter = s["eud"].shape[-1]
                out = torch.cat([out[:, :inter], out[:, inter:] / s["eud"].unsqueeze(-1)], dim=1)
        elif role == "o":
            heads = (w.reshape(w.shape[0], -1, self.hd) @ r2)
            if "ov" in s:
                heads = heads * s["ov"].repeat_interleave(self.kv_groups, dim=0)
            out = r1.T @ heads.reshape(w.shape)
        elif role == "down":
            x = r1.T @ w
            out = hadamard_transform(x * s["ud"] if "ud" in s else x)
        elif role == "e_down":
            x = torch.matmul(r1.T, w)
            out = hadamard_transform(x * s["eud"].unsqueeze(1) if "eud" in s else x)
        else:
            raise ValueError(role)
        if self.weight_format is not None and role != "router" and (role != "head" or self.head_quantized):
            out = ste_quantize(out, self.weight_format)
        return out

    def logits(self, r1, r2s, scales, ids) -> torch.Tensor:
        """The transformed, fake-quantized model's logits on `ids` (every quantizer straight-through)."""
        dtype = next(iter(self.model.parameters())).dtype
        r1 = r1.to(dtype)
        self.current = r1
        try:
            params = {}
            for name, w, role, i in self.sites:
                s = {k: v.to(dtype) for k, v in scales[i].items()} if i >= 0 else {}
                params[name] = self._param(w, role, r1, r2s[i].to(dtype) if i >= 0 else None, s)
            with straight_through(self.model):
                return torch.func.functional_call(self.model, params, (ids,), {"use_cache": False}).logits
        finally:
            self.current = None
