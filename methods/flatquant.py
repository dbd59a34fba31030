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
KV cache; straight-through gradients, except the KV cache's plain fake-quant, whose gradient is autograd's
through the rounding: only via each group's scale), and the MSE to the FP layer output is minimised with AdamW
(paper: 15 epochs, lr 5e-3, clip lr x10, batch 4, cosine decay to lr·1e-3, 128 x 2048 WikiText-2
tokens; as the reference code: weight decay 0.01, batches in order, each step's loss divided by its own
detached value). d is initialised SmoothQuant-style, d = max|W_j|^(1-α) / max|X_j|^α with α = 0.3. Factor
init: random orthogonal U, V (the paper's code) or a Hadamard (`init: hadamard`; sizes without a
Hadamard fall back to random orthogonal) or the identity. Then weights RTN with the learned clips (the
paper's FlatQuant-RTN, default) or GPTQ on the transformed weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from harness.affine import (
    AffineFactor,
    AffineTransforms,
    KroneckerAffine,
    experts_transform_as_pre_hook,
    install_affine,
    quantize_weights_with_clips,
    set_activation_clips,
    weight_roles,
)
from harness.affine_train import (
    AffineLayerTrainer,
    layerwise_metrics,
    layerwise_training_copy,
    site_factor_sizes,
    site_input_maxima,
    site_readers,
    site_sizes,
)
from harness.calib import walk_layers
from harness.errors import InvalidValueError
from harness.method import CalibContext, Method, MethodParams, load_solved_weights, scheme_to_dict
from harness.registry import register_method
from harness.state import State
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


def smooth_diag(amax: torch.Tensor | None, readers: list[torch.Tensor], alpha: float) -> torch.Tensor | None:
    """SmoothQuant-style d = max|W_j|^(1-α) / max|X_j|^α (None without input statistics)."""
    if amax is None:
        return None
    wmax = torch.stack([w.detach().abs().reshape(-1, w.shape[-1]).amax(0).float() for w in readers]).amax(0)
    return (wmax.clamp_min(1e-5) ** (1 - alpha)) / (amax.clamp_min(1e-5) ** alpha)


class FlatQuantParams(MethodParams):
    weight_solver: Literal["rtn", "gptq"] = "rtn"
    gptq_damp: NonNegativeFloat = 0.01
    gptq_block_size: PositiveInt = 128
    epochs: NonNegativeInt = 15
    lr: PositiveFloat = 5e-3
    clip_lr_mult: NonNegativeFloat = 10.0
    weight_decay: NonNegativeFloat = Field(0.01, le=1.0)  # torch AdamW's default, which the reference keeps
    batch_size: PositiveInt = 4
    samples: PositiveInt | None = None  # calibration windows; None: the cell's
    seqlen: PositiveInt | None = None
    init: Literal["random", "hadamard", "identity"] = "random"
    diag: bool = True
    diag_alpha: float = Field(0.3, ge=0, le=1)
    lwc: bool = True
    lac: bool = True
    clip_init: float = Field(4.0, ge=-20, le=20)  # clip ratio sigmoid(θ), θ = clip_init at init (saturated beyond ±20)
    weight_quant_in_loop: bool = True
    o_transform: bool = True
    rotate_kv: bool = True  # Hadamard on Q/K after RoPE when the scheme quantizes the KV cache


@dataclass(kw_only=True)
class FlatQuantState(State):
    """The learned transforms, per layer the activation clip ratio of each site (LAC) and the per-output-
    channel clip ratios of each weight role (LWC), the fixed Q/K Hadamard, and GPTQ weights if solved."""

    transforms: AffineTransforms
    act_clips: list[dict[str, float]] = field(default_factory=list)
    weight_clips: list[dict[str, torch.Tensor]] = field(default_factory=list)
    qk: torch.Tensor | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


@register_method("flatquant")
class FlatQuant(Method):
    """Learned Kronecker affine transforms per layer (layer-wise MSE), then RTN (with learned clips) or GPTQ."""

    version = 2  # 2: weight decay 0.01, in-order batches, self-normalised loss (as the reference)
    Params = FlatQuantParams
    state_type = FlatQuantState
    conformance_params = {"epochs": 1, "samples": 2, "batch_size": 2}

    def calib_scheme_key(self, scheme):
        return scheme_to_dict(scheme)  # weights, activations and KV are all in the training loop

    # ---- calibration -----------------------------------------------------------------------------
    def calibrate(self, ctx: CalibContext) -> FlatQuantState:
        from harness.quant import get_scheme

        p = self.params
        scheme = get_scheme(ctx.scheme) if ctx.scheme is not None else get_scheme("w16a16")
        if scheme.lm_head or scheme.embeddings:
            raise InvalidValueError("scheme for flatquant", scheme.name, "one that keeps lm_head and embeddings in FP")
        t0 = time.perf_counter()
        ids = ctx.training_windows(p.samples, p.seqlen).to(next(ctx.model.parameters()).device)
        qk = hadamard(ctx.adapter.head_dim) if p.rotate_kv and scheme.kv is not None else None
        work, adapter = layerwise_training_copy(ctx.model, kv=scheme.kv is not None or qk is not None)
        wfmt = scheme.weight if p.weight_quant_in_loop else None
        state = FlatQuantState(transforms=AffineTransforms(), qk=qk)
        records, steps = [], 0
        for step in walk_layers(work, adapter, ids, min(p.batch_size, ids.shape[0]), dtype=torch.float32,
                                progress=ctx.progress, desc="FlatQuant layers"):
            view = step.view
            with torch.no_grad(), site_input_maxima(view) as amax:
                targets = step.forward()  # FP layer outputs: the targets, and the next layer's inputs
            sites = self.initial_sites(view, adapter, amax, ctx.seed)
            # activation clips, one per site (a MoE layer's experts share the "mlp" one); weight clips per channel
            act_clips = {s: nn.Parameter(torch.tensor(float(p.clip_init))) for s in sites if s != "experts_down"} \
                if scheme.activation is not None and p.lac else {}
            weight_clips = {r: nn.Parameter(torch.full(w.shape[:-1], float(p.clip_init)))
                            for r, w in weight_roles(view).items()} if wfmt is not None and p.lwc else {}
            layer = AffineLayerTrainer(view, adapter.head_dim, sites, scheme.activation, act_clips, wfmt, weight_clips,
                                       kv_format=scheme.kv, qk=qk)
            record = self.train(layer, step.hidden, step.kwargs, targets)
            steps += record["steps"]
            records.append(record)
            learned, clips, lwc = layer.export()
            state.transforms.layers.append(learned)
            state.act_clips.append(clips)
            state.weight_clips.append(lwc)
            layer.clear()
            step.outputs = targets
        del work
        seconds = time.perf_counter() - t0
        state.meta = {"steps": steps, "info": {"layers": records, "seed": ctx.seed, "init": p.init,
                                               "windows": list(ids.shape), "transform_seconds": seconds}}
        if p.weight_solver == "gptq" and scheme.weight is not None:
            state.weights, state.meta["gptq"] = self.gptq(ctx, ids, state, scheme.weight)
        state.meta["info"]["metrics"] = layerwise_metrics(records, steps, seconds)
        return state

    def initial_sites(self, view, adapter, amax: dict, seed: int) -> dict[str, KroneckerAffine]:
        """Per site: factors at their init, the diagonal SmoothQuant-style from the FP input maxima."""
        p = self.params
        readers = site_readers(view)
        sites = {}
        for site, n in site_sizes(view, adapter, p.o_transform).items():
            n1, n2 = site_factor_sizes(site, n, adapter)
            d = smooth_diag(amax[site].amax, readers[site], p.diag_alpha) if p.diag and site != "o" else None
            # the down sites' diagonal is folded into up's rows (in training too)
            sites[site] = KroneckerAffine(initial_factor(n1, p.init, factor_seed(seed, view.index, site, 1)),
                                          initial_factor(n2, p.init, factor_seed(seed, view.index, site, 2)),
                                          d, online=(True, False) if site == "o" else (True, True),
                                          diag_online=site not in ("down", "experts_down"))
        return sites

    def train(self, layer: AffineLayerTrainer, hidden, kwargs, targets) -> dict:
        """Minimise the layer-wise MSE to the FP outputs: AdamW, cosine to lr·1e-3, batches in order."""
        p = self.params
        t0 = time.perf_counter()
        x_all, y_all = torch.cat(hidden), torch.cat(targets)
        n, bs = x_all.shape[0], hidden[0].shape[0]
        kw = kwargs[0]
        mse_init = layer.mse(hidden, kwargs, targets)
        trans, clips = layer.parameters()
        groups = [{"params": trans, "lr": p.lr}]
        if clips:
            groups.append({"params": clips, "lr": p.lr * p.clip_lr_mult})
        per_epoch = math.ceil(n / bs)
        total = p.epochs * per_epoch
        losses = []
        if total > 0:
            # as the reference: AdamW's default weight decay (0.01), batches in order, and each step's loss
            # divided by its own detached value (a unit-size gradient step whatever the layer's error scale)
            opt = torch.optim.AdamW(groups, weight_decay=p.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=p.lr * 1e-3)
            with torch.enable_grad():
                for _ in range(p.epochs):
                    for j in range(per_epoch):
                        pick = torch.arange(j * bs, j * bs + bs, device=x_all.device) % n
                        loss = F.mse_loss(layer.forward(x_all[pick], kw), y_all[pick])
                        losses.append(float(loss.detach()))
                        loss = loss / loss.detach().clamp_min(torch.finfo(loss.dtype).tiny)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
        mse_final = layer.mse(hidden, kwargs, targets)
        return {"layer": layer.view.index, "steps": total, "mse_init": mse_init, "mse_final": mse_final,
                "loss_first": losses[0] if losses else mse_init, "loss_last": losses[-1] if losses else mse_final,
                "seconds": round(time.perf_counter() - t0, 3)}

    def gptq(self, ctx, ids, state: FlatQuantState, wfmt) -> tuple[dict[str, torch.Tensor], dict]:
        """GPTQ weights of the model with the learned transforms installed (solved on a copy)."""
        from harness.gptq import gptq_after_transform

        def install(work, adapter):
            install_affine(work, adapter, state.transforms, state.qk)
            experts_transform_as_pre_hook(adapter)

        weights = gptq_after_transform(ctx.model, install, ids, wfmt, block_size=self.params.gptq_block_size,
                                       damp=self.params.gptq_damp, progress=ctx.progress)
        return dict(weights), {"n_weights": len(weights), "weight_format": wfmt.name}

    # ---- application -----------------------------------------------------------------------------
    def apply(self, model, adapter, state: FlatQuantState, scheme):
        from harness.quant import apply_scheme, get_scheme

        scheme = get_scheme(scheme)
        install_affine(model, adapter, state.transforms, state.qk)
        if not load_solved_weights(model, state.weights) and scheme.weight is not None:
            quantize_weights_with_clips(adapter, scheme.weight, state.weight_clips)  # FlatQuant-RTN
        apply_scheme(model, adapter, scheme, quantize_weights=False)
        if scheme.activation is not None:
            set_activation_clips(adapter, scheme.activation, state.act_clips)
        self._metrics = dict(state.meta.get("info", {}).get("metrics", {}))
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))
