"""FlatQuant: Flatness Matters for LLM Quantization (Sun et al., ICML 2025, arXiv 2410.09426).

Per decoder layer, a learnable invertible affine transform at every linear input, T = diag(d) (P1 ⊗ P2)
(harness.affine: Kronecker factors of the most balanced split of the size, each P = U diag(σ) Vᵀ with
orthogonal U, V, so the inverse is exact and cheap):

* "qkv" (hidden): after the attention norm, before q/k/v; d folded into the norm's scale.
* "o": before o_proj, P_heads ⊗ P_head_dim; the head_dim factor is fused into v_proj's output (so the
  V cache is quantized in that basis), the heads factor mixes online; no diagonal there.
* "mlp" (hidden): before gate/up (and a MoE layer's routed experts and shared expert; routers stay in
  full precision, compensated for d).
* "down" (intermediate): before down_proj (the shared expert's down in MoE layers); d folded into up's rows.
* "experts_down": one transform shared by every routed expert's down input; d into each expert's up rows.
Weights get W T⁻ᵀ offline; the factors act online as two small matmuls. With the KV cache quantized, a
fixed Hadamard rotates Q and K after RoPE (QuaRot's R3; FlatQuant learns that one too, not done here).

Learnable clipping: per output channel for weights (LWC), one ratio per site for activations (LAC), both
sigmoid(θ) with θ = 4 at init (ratio 0.982); the activation ratio becomes the format's clip_ratio at
inference. A MoE layer's experts module has a single activation format, so its input and down clips
are one parameter (shared with the shared expert's gate/up).

Calibration, layer by layer: the layer's FP input (from the FP model, no error propagation) goes through
the layer with transforms and the cell's scheme in the loop (weights with LWC, activations with LAC,
KV cache; straight-through gradients), and the MSE to the FP layer output is minimised with AdamW
(paper: 15 epochs, lr 5e-3, clip lr x10, batch 4, cosine decay to lr·1e-3, 128 x 2048 WikiText-2
tokens). d is initialised SmoothQuant-style, d = max|W_j|^(1-α) / max|X_j|^α with α = 0.3. Factor
init: random orthogonal U, V (the paper's code) or a Hadamard (`init: hadamard`; sizes without a
Hadamard fall back to random orthogonal) or the identity. Then weights RTN with the learned clips (the
paper's FlatQuant-RTN, default) or GPTQ on the transformed weights.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harness.affine import (
    AffineFactor,
    AffineTransforms,
    KroneckerAffine,
    balanced_factors,
    clipped_fake_quant,
    install_affine,
    with_clip,
)
from harness.errors import InvalidValueError
from harness.method import (
    CalibContext,
    Method,
    MethodParams,
    State,
    load_solved_weights,
    solved_weight_tensors,
)
from harness.registry import register_method
from harness.transforms import hadamard, is_hadamard_order, random_orthogonal

SITE_INDEX = {"qkv": 0, "o": 1, "mlp": 2, "down": 3, "experts_down": 4}


def factor_seed(seed: int, layer: int, site: str, which: int) -> int:
    return seed * 1_000_003 + layer * 97 + SITE_INDEX[site] * 7 + which


def initial_factor(n: int, init: str, seed: int) -> AffineFactor:
    """U0, V0 of one factor: P starts at the identity, at a Hadamard, or at a random orthogonal matrix."""
    if init == "identity":
        return AffineFactor(torch.eye(n))
    if init == "hadamard" and is_hadamard_order(n):
        return AffineFactor(hadamard(n))
    return AffineFactor(random_orthogonal(n, seed), random_orthogonal(n, seed + 500_009))


class _AbsMax(nn.Module):
    """Identity that records the per-channel max |x| (for the diagonal's SmoothQuant-style init)."""

    def __init__(self):
        super().__init__()
        self.amax = None

    def forward(self, x):
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)
        return x


class _TrainSite(nn.Module):
    """Training-time site: the online part of the transform, then fake quantization with the learnable
    activation clip (straight-through). q/k/v (gate/up) pass the same tensor: computed once per forward."""

    def __init__(self, transform: KroneckerAffine, fmt, clip: nn.Parameter | None):
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


class FlatQuantParams(MethodParams):
    weight_solver: Literal["rtn", "gptq"] = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    epochs: int = 15
    lr: float = 5e-3
    clip_lr_mult: float = 10.0
    batch_size: int = 4
    samples: int | None = None  # calibration windows; None: the cell's
    seqlen: int | None = None
    init: Literal["random", "hadamard", "identity"] = "random"
    diag: bool = True
    diag_alpha: float = 0.3
    lwc: bool = True
    lac: bool = True
    clip_init: float = 4.0
    weight_quant_in_loop: bool = True
    o_transform: bool = True
    rotate_kv: bool = True  # Hadamard on Q/K after RoPE when the scheme quantizes the KV cache


@register_method("flatquant")
class FlatQuant(Method):
    """Learned Kronecker affine transforms per layer (layer-wise MSE), then RTN (with learned clips) or GPTQ."""

    version = 1
    Params = FlatQuantParams

    # ---- calibration -----------------------------------------------------------------------------
    def calibrate(self, ctx: CalibContext) -> State:
        from harness.gptq import capture_layer_inputs, layer_kwargs
        from harness.models import get_adapter
        from harness.quant import (
            get_scheme,
            install_kv_quant,
            wrap_experts,
            wrap_linear,
        )
        from harness.rotation.fuse import OnlineTransform

        p = self.params
        scheme = get_scheme(ctx.scheme) if ctx.scheme is not None else get_scheme("w16a16")
        if scheme.lm_head or scheme.embeddings:
            raise InvalidValueError("scheme for flatquant", scheme.name, "one that keeps lm_head and embeddings in FP")
        t0 = time.perf_counter()
        device = next(ctx.model.parameters()).device
        ids = ctx.training_windows(p.samples, p.seqlen).to(device)
        work = copy.deepcopy(ctx.model).float().requires_grad_(False)
        adapter = get_adapter(work)
        for view in adapter.layers():
            for _, parent, attr in view.linear_sites():
                wrap_linear(parent, attr)
            if view.experts is not None:
                wrap_experts(view)
        hd = adapter.head_dim
        qk = hadamard(hd) if p.rotate_kv and scheme.kv is not None else None
        if scheme.kv is not None or qk is not None:
            install_kv_quant(work, [], None)  # routes attention through the KV wrapper (inactive until set)
        bs = min(p.batch_size, ids.shape[0])
        layers = adapter.layers()
        with torch.no_grad():
            first = capture_layer_inputs(work, layers[0].module, ids, bs)
            kwargs_per_layer = layer_kwargs(work, layers, ids, bs, first)
        hidden = [x.float() for x, _ in first]
        del first
        wfmt = scheme.weight if p.weight_quant_in_loop else None
        result = AffineTransforms()
        tensors: dict[str, torch.Tensor] = {}
        records, steps = [], 0
        pairs = list(zip(layers, kwargs_per_layer))
        for view, kwargs in (ctx.progress(pairs, desc="FlatQuant layers") if ctx.progress else pairs):
            kwargs = [_float_kwargs(kw) for kw in kwargs]
            trainer = _LayerTrainer(view, adapter, scheme, wfmt, p, ctx.seed)
            targets = trainer.fp_outputs(hidden, kwargs)
            trainer.build()
            if scheme.kv is not None or qk is not None:
                view.attn.kv_format = scheme.kv
                if qk is not None:
                    q32 = qk.float().to(device)
                    view.attn.qk_rotation = OnlineTransform(apply_fn=lambda x, q=q32: x @ q, name="R3")
            record = trainer.train(hidden, kwargs, targets)
            view.attn.kv_format, view.attn.qk_rotation = None, None
            steps += record["steps"]
            records.append(record)
            sites, clips, lwc = trainer.export()
            result.layers.append(sites)
            tensors.update({f"clip.{view.index}.{k}": v for k, v in clips.items()})
            tensors.update({f"lwc.{view.index}.{k}": v for k, v in lwc.items()})
            trainer.detach()
            hidden = targets
        del work, hidden
        tensors.update(result.to_tensors())
        if qk is not None:
            tensors["qk"] = qk
        seconds = time.perf_counter() - t0
        meta = {"steps": steps, "info": {"layers": records, "seed": ctx.seed, "init": p.init,
                                         "windows": list(ids.shape), "transform_seconds": seconds}}
        if p.weight_solver == "gptq" and scheme.weight is not None:
            meta["gptq"] = self._gptq(ctx, ids, result, qk, scheme.weight, tensors)
        first_mse = [r["mse_init"] for r in records]
        last_mse = [r["mse_final"] for r in records]
        meta["info"]["metrics"] = {
            "mse_init": sum(first_mse) / len(first_mse), "mse_final": sum(last_mse) / len(last_mse),
            "mse_ratio": sum(b / a for a, b in zip(first_mse, last_mse) if a > 0) / len(records),
            "steps": float(steps), "transform_seconds": round(seconds, 3)}
        return State(tensors=tensors, meta=meta)

    def _gptq(self, ctx, ids, transforms, qk, wfmt, tensors) -> dict:
        from harness.gptq import gptq_after_transform

        def install(work, adapter):
            install_affine(work, adapter, transforms, qk)
            _experts_transform_as_pre_hook(adapter)

        weights = gptq_after_transform(ctx.model, install, ids, wfmt, block_size=self.params.gptq_block_size,
                                       damp=self.params.gptq_damp, progress=ctx.progress)
        tensors.update(solved_weight_tensors(weights))
        return {"n_weights": len(weights), "weight_format": wfmt.name}

    def calib_scheme_key(self, scheme):
        from harness.method import scheme_to_dict

        return scheme_to_dict(scheme)  # weights, activations and KV are all in the training loop

    # ---- application -----------------------------------------------------------------------------
    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import QuantExperts, apply_scheme, get_scheme, wrap_linear

        scheme = get_scheme(scheme)
        transforms = AffineTransforms.from_tensors(state.tensors, adapter.num_layers)
        install_affine(model, adapter, transforms, state.tensors.get("qk"))
        if not load_solved_weights(model, state) and scheme.weight is not None:
            with torch.no_grad():  # RTN with the learned per-channel clip ratios
                for view in adapter.layers():
                    for role, weight in _weight_roles(view):
                        ratio = state.tensors.get(f"lwc.{view.index}.{role}")
                        ratio = None if ratio is None else ratio.to(weight.device, torch.float32)
                        weight.copy_(clipped_fake_quant(weight.data, scheme.weight, ratio))
        apply_scheme(model, adapter, scheme, quantize_weights=False)
        if scheme.activation is not None:
            for view in adapter.layers():
                for site, modules in _clip_sites(view).items():
                    ratio = state.tensors.get(f"clip.{view.index}.{site}")
                    if ratio is None:
                        continue
                    for parent, attr in modules:
                        module = getattr(parent, attr) if attr else parent
                        if not isinstance(module, QuantExperts) and attr:
                            module = wrap_linear(parent, attr)
                        module.act_format = with_clip(scheme.activation, float(ratio))
        self._metrics = dict(state.meta.get("info", {}).get("metrics", {}))
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))


# ---- helpers -----------------------------------------------------------------------------------------


def _float_kwargs(kw: dict) -> dict:
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in v)
                if isinstance(v, tuple) else v) for k, v in kw.items()}


def _weight_roles(view) -> list[tuple[str, torch.Tensor]]:
    """(role, weight) of every quantized weight of a layer (experts as fused 3-D tensors)."""
    out = [(role, lin.weight) for role, lin in view.linears().items()]
    if view.experts is not None:
        out += [("experts.gate_up", view.experts.gate_up), ("experts.down", view.experts.down)]
    return out


def _clip_sites(view) -> dict[str, list[tuple[nn.Module, str | None]]]:
    """Activation-clip site -> (parent, attribute) of the wrappers it sets (None: the module itself)."""
    out = {"qkv": [(view.attn, "q_proj"), (view.attn, "k_proj"), (view.attn, "v_proj")], "o": [(view.attn, "o_proj")]}
    if view.dense_mlp is not None:
        out["mlp"] = [(view.dense_mlp, "gate_proj"), (view.dense_mlp, "up_proj")]
        out["down"] = [(view.dense_mlp, "down_proj")]
    if view.experts is not None:
        out.setdefault("mlp", []).append((view.experts.module, None))
    return out


def _experts_transform_as_pre_hook(adapter) -> None:
    """GPTQ's expert Hessians read the experts' raw input: move an experts input transform into a forward
    pre-hook so that the Hessians (and the down inputs it derives) see the transformed input."""
    from harness.quant import QuantExperts

    for view in adapter.layers():
        if view.experts is None or not isinstance(view.experts.module, QuantExperts):
            continue
        module = view.experts.module
        transform = module.input_transform
        if transform is None:
            continue
        module.input_transform = None

        def pre(_mod, args, kwargs, t=transform):
            if args:
                return (t(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": t(kwargs["hidden_states"])}

        module.register_forward_pre_hook(pre, with_kwargs=True)


class _LayerTrainer:
    """One decoder layer of the work model with trainable site transforms, clips and weight functions."""

    def __init__(self, view, adapter, scheme, wfmt, params: FlatQuantParams, seed: int):
        self.view, self.adapter, self.scheme, self.wfmt, self.p, self.seed = view, adapter, scheme, wfmt, params, seed
        self.afmt = scheme.activation
        self.geometry = adapter.attention
        self.recorders: dict[str, _AbsMax] = {}
        self.sites: dict[str, KroneckerAffine] = {}
        self.clips: dict[str, nn.Parameter] = {}
        self.lwc: dict[str, nn.Parameter] = {}
        self.train_sites: list[_TrainSite] = []

    def _site_wrappers(self) -> dict[str, list]:
        v = self.view
        out = {"qkv": [getattr(v.attn, a) for a in ("q_proj", "k_proj", "v_proj")], "o": [getattr(v.attn, "o_proj")],
               "mlp": [], "down": []}
        if v.dense_mlp is not None:
            out["mlp"] = [getattr(v.dense_mlp, "gate_proj"), getattr(v.dense_mlp, "up_proj")]
            out["down"] = [getattr(v.dense_mlp, "down_proj")]
        return out

    def _site_sizes(self) -> dict[str, int]:
        v, g = self.view, self.geometry
        sizes = {"qkv": self.adapter.hidden_size, "mlp": self.adapter.hidden_size}
        if self.p.o_transform:
            sizes["o"] = g.num_heads * g.head_dim
        if v.dense_mlp is not None:
            sizes["down"] = v.mlp_out[0].in_features
        if v.experts is not None:
            sizes["experts_down"] = v.experts.intermediate_size
        return sizes

    @torch.no_grad()
    def fp_outputs(self, hidden, kwargs):
        """FP outputs of the layer on every batch, recording the per-channel input maxima of each site."""
        v = self.view
        wrappers = self._site_wrappers()
        self.recorders = {site: _AbsMax() for site in ("qkv", "mlp", "down", "experts_down")}
        wrappers["qkv"][0].input_transform = self.recorders["qkv"]
        if wrappers["mlp"]:
            wrappers["mlp"][0].input_transform = self.recorders["mlp"]
        elif v.experts is not None:
            v.experts.module.input_transform = self.recorders["mlp"]
        if wrappers["down"]:
            wrappers["down"][0].input_transform = self.recorders["down"]
        if v.experts is not None:
            v.experts.module.down_transform = self.recorders["experts_down"]
        outs = [_layer_out(v.module, x, kw) for x, kw in zip(hidden, kwargs)]
        self._clear()
        return outs

    def _clear(self):
        for mods in self._site_wrappers().values():
            for m in mods:
                m.input_transform = None
                m.act_format = None
        if self.view.experts is not None:
            e = self.view.experts.module
            e.input_transform, e.down_transform, e.act_format = None, None, None

    def _diag_init(self, site: str, readers: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.p.diag or site == "o":
            return None
        amax = self.recorders[site].amax
        if amax is None:
            return None
        wmax = torch.stack([w.detach().abs().reshape(-1, w.shape[-1]).amax(0).float() for w in readers]).amax(0)
        a = self.p.diag_alpha
        return (wmax.clamp_min(1e-5) ** (1 - a)) / (amax.clamp_min(1e-5) ** a)

    def build(self):
        p, v, g = self.p, self.view, self.geometry
        readers = {"qkv": [v.q.weight, v.k.weight, v.v.weight], "o": [v.o.weight],
                   "mlp": [lin.weight for lin in v.mlp_in] + ([v.experts.gate_up] if v.experts is not None else []),
                   "down": [lin.weight for lin in v.mlp_out],
                   "experts_down": [v.experts.down] if v.experts is not None else []}
        for site, n in self._site_sizes().items():
            n1, n2 = (g.num_heads, g.head_dim) if site == "o" else balanced_factors(n)
            f1 = initial_factor(n1, p.init, factor_seed(self.seed, v.index, site, 1))
            f2 = initial_factor(n2, p.init, factor_seed(self.seed, v.index, site, 2))
            # the down sites' diagonal is folded into up's rows (in training too: see `weights`)
            self.sites[site] = KroneckerAffine(f1, f2, self._diag_init(site, readers[site]),
                                               online=(True, False) if site == "o" else (True, True),
                                               diag_online=site not in ("down", "experts_down"))
        # activation clips (one per site; a MoE layer's experts share the "mlp" one)
        if self.afmt is not None and p.lac:
            for site in self.sites:
                if site != "experts_down":
                    self.clips[site] = nn.Parameter(torch.tensor(float(p.clip_init)))
        # weights: base copies and names inside the layer module
        names = {id(param): n for n, param in v.module.named_parameters()}
        self.base = {}
        for role, weight in _weight_roles(v):
            self.base[role] = (names[id(weight)], weight.detach().clone().float())
            if self.wfmt is not None and p.lwc:
                self.lwc[role] = nn.Parameter(torch.full(weight.shape[:-1], float(p.clip_init)))
        self.v_bias = (names[id(v.v.bias)], v.v.bias.detach().clone().float()) if v.v.bias is not None else None
        up = v.mlp_in[1] if len(v.mlp_in) == 2 else None
        self.up_bias = (names[id(up.bias)], up.bias.detach().clone().float()) if up is not None and up.bias is not None else None
        self._install_train_sites()

    def _site(self, site: str):
        return self.sites.get(site)

    def _install_train_sites(self):
        wrappers = self._site_wrappers()
        for site in ("qkv", "o", "mlp", "down"):
            t = self._site(site)
            if t is None:
                continue
            ts = _TrainSite(t, self.afmt, self.clips.get(site))
            self.train_sites.append(ts)
            for w in wrappers[site]:
                w.input_transform, w.act_format = ts, None
            if site == "mlp" and self.view.experts is not None:
                self.view.experts.module.input_transform = ts
        if self.view.experts is not None:
            e = self.view.experts.module
            e.act_format = None
            if e.input_transform is None and self.afmt is not None:  # no mlp transform: quantize only
                e.input_transform = _TrainSite(_Identity(), self.afmt, self.clips.get("mlp"))
                self.train_sites.append(e.input_transform)
            t = self._site("experts_down")
            e.down_transform = _TrainSite(t if t is not None else _Identity(), self.afmt,
                                          self.clips.get("mlp"))
            self.train_sites.append(e.down_transform)
        for mods in wrappers.values():  # readers of sites without a transform still quantize their input
            for w in mods:
                if w.input_transform is None and self.afmt is not None:
                    w.input_transform = _TrainSite(_Identity(), self.afmt, None)
                    self.train_sites.append(w.input_transform)

    def parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        trans = [q for t in self.sites.values() for q in t.parameters()]
        return trans, list(self.clips.values()) + list(self.lwc.values())

    def weights(self) -> dict[str, torch.Tensor]:
        """Layer parameters as functions of the transforms (then fake-quantized with the LWC clips)."""
        v, hd = self.view, self.geometry.head_dim
        qkv, o, mlp, down, edown = (self._site(s) for s in ("qkv", "o", "mlp", "down", "experts_down"))
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
                    inter = v.experts.intermediate_size
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
    def objective(self, hidden, kwargs, targets) -> float:
        total, count = 0.0, 0
        for x, kw, y in zip(hidden, kwargs, targets):
            total += float(F.mse_loss(self.forward(x, kw), y, reduction="sum"))
            count += y.numel()
        return total / count

    def train(self, hidden, kwargs, targets) -> dict:
        p = self.p
        t0 = time.perf_counter()
        x_all, y_all = torch.cat(hidden), torch.cat(targets)
        n, bs = x_all.shape[0], hidden[0].shape[0]
        kw = kwargs[0]
        mse_init = self.objective(hidden, kwargs, targets)
        trans, clips = self.parameters()
        groups = [{"params": trans, "lr": p.lr}]
        if clips:
            groups.append({"params": clips, "lr": p.lr * p.clip_lr_mult})
        per_epoch = math.ceil(n / bs)
        total = p.epochs * per_epoch
        losses = []
        if total > 0:
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=p.lr * 1e-3)
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.view.index)
            with torch.enable_grad():
                for _ in range(p.epochs):
                    perm = torch.randperm(n, generator=gen)
                    for j in range(per_epoch):
                        pick = perm[[(j * bs + t) % n for t in range(bs)]].to(x_all.device)
                        loss = F.mse_loss(self.forward(x_all[pick], kw), y_all[pick])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
                        losses.append(float(loss.detach()))
        mse_final = self.objective(hidden, kwargs, targets)
        return {"layer": self.view.index, "steps": total, "mse_init": mse_init, "mse_final": mse_final,
                "loss_first": losses[0] if losses else mse_init, "loss_last": losses[-1] if losses else mse_final,
                "seconds": round(time.perf_counter() - t0, 3)}

    def export(self):
        sites = {s: t.export() for s, t in self.sites.items()}
        clips = {s: torch.sigmoid(c.detach()).to(torch.float64) for s, c in self.clips.items()}
        lwc = {r: torch.sigmoid(c.detach()).to(torch.float64) for r, c in self.lwc.items()}
        return sites, clips, lwc

    def detach(self):
        """Leave the work model's layer as it was (FP, no transforms), for memory."""
        self._clear()
        self.train_sites, self.sites = [], {}


class _Identity(nn.Module):
    def act(self, x):
        return x


def _layer_out(layer, x, kw, params=None):
    out = layer(x, **kw) if params is None else torch.func.functional_call(layer, params, (x,), kw, strict=False)
    return out[0] if isinstance(out, tuple) else out
