"""WKVQuant: Quantizing Weight and Key/Value Cache for LLMs Gains More (Yue et al., arXiv 2402.12065).

W + KV quantization (linear-layer activations stay 16-bit). No public code: a reconstruction from the
paper's method section; the deviations are listed below.

Per decoder layer l, in order, on the calibration windows (inputs X_l from the already quantized layers
below, targets from the FP model):
1. Past-only quantization: in attention, a token reads its own K/V in full precision and only past
   entries from the quantized cache (harness.kv.KVPolicy window = 1; `past_only: false` quantizes the
   current token too, the ablation).
2. Two-dimensional KV quantization: a static per-channel smoothing of the cached K and V (shift δ and
   scale s per channel of all KV heads, learned), then dynamic per-token group quantization:
   K̂ = s · Q((K − δ) / s) + δ (harness.kv.ChannelSmoothing). Init: δ = the channel's mid-range,
   s = (range / mean range)^½ over the calibration tokens.
3. Cross-block reconstruction regularisation: the learnable weight clipping (OmniQuant's LWC, one
   sigmoid-parametrised clip ratio per output channel, init σ(4) ≈ 0.98) and the smoothing of layer l are
   trained with AdamW to minimise the mean absolute error between the FP model's output after blocks
   l .. l + k and the output of the quantized block l followed by the FP blocks l+1 .. l+k (k =
   `crr_blocks`; k = 0 is OmniQuant's block-wise loss). Rounding is straight-through.
Then the layer keeps its quantized weights for the next layer's inputs.

Deviations (likely effect): one clip ratio per output channel instead of OmniQuant's separate per-group
upper / lower bounds (slightly weaker clipping); `epochs` 5 at smoke scale (the paper follows OmniQuant's
20; less training); the smoothing init and learning rates are OmniQuant's LET values (the paper gives
none); keys are smoothed after RoPE (what the HF cache stores; the paper does not say); the calibration
text is the harness corpus (the paper: 128 x 2048 WikiText-2).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from harness.affine import clipped_fake_quant, weight_roles
from harness.calib.driver import capture_layer_inputs, layer_kwargs, run_layer
from harness.errors import InvalidValueError
from harness.kv import ChannelSmoothing, KVPolicy
from harness.kv.stats import KVRanges
from harness.method import CalibContext, Method, MethodParams
from harness.registry import register_method
from harness.state import State

ROLES = ("key", "value")
CLIP_INIT = 4.0  # OmniQuant's LWC init: sigmoid(4) = 0.982


@dataclass(kw_only=True)
class WKVQuantState(State):
    """Per decoder layer: clip_<role> (ratio per output channel) for each weight, and the K/V smoothing
    (key_shift, key_scale, value_shift, value_scale per KV channel)."""

    layers: list[dict[str, torch.Tensor]] = field(default_factory=list)


def smoothing_init(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    span = (hi - lo).clamp_min(1e-6)
    return (hi + lo) / 2, (span / span.mean()).sqrt()


@register_method("wkvquant")
class WKVQuant(Method):
    """Past-only KV quantization, learned 2-D KV smoothing and weight clipping with a cross-block loss."""

    version = 1
    state_type = WKVQuantState

    class Params(MethodParams):
        past_only: bool = True  # a token reads its own K/V unquantized
        smoothing: bool = True  # learned per-channel shift / scale of K and V (2-D quantization)
        learn_clip: bool = True  # learned weight clipping (LWC)
        crr_blocks: NonNegativeInt = 1  # following FP blocks inside the loss (0: block-wise reconstruction)
        epochs: PositiveInt = 5  # passes over the calibration windows per layer (paper / OmniQuant: 20)
        lr_clip: float = Field(1e-2, gt=0, le=1)  # OmniQuant's lwc_lr
        lr_smooth: float = Field(5e-3, gt=0, le=1)  # OmniQuant's let_lr
        batch_size: PositiveInt = 1

    def policy(self, scheme: Any) -> KVPolicy:
        kv = getattr(scheme, "kv", None)
        if kv is None or isinstance(kv, KVPolicy):
            raise InvalidValueError("scheme kv for wkvquant", getattr(kv, "to_dict", lambda: kv)(),
                                    "a plain KV format (wkvquant sets the past-only window itself), e.g. {weight: int4_asym_g128, kv: int4_asym}")
        return KVPolicy(key=kv, value=kv, window=1 if self.params.past_only else 0)

    def calib_scheme_key(self, scheme: Any) -> Any:
        w = getattr(scheme, "weight", None)
        return {"weight": w and w.to_dict(), "kv": self.policy(scheme).to_dict()}

    def calibrate(self, ctx: CalibContext) -> WKVQuantState:
        from harness.quant import install_kv_quant

        p, scheme = self.params, ctx.scheme
        policy, wfmt = self.policy(scheme), getattr(scheme, "weight", None)
        model, views = ctx.model, ctx.adapter.layers()
        install_kv_quant(model, [v.attn for v in views], None)  # the KV wrapper: observers and policies
        for param in model.parameters():  # only the clips and smoothings learn
            param.requires_grad_(False)
        calib = ctx.calib_inputs()
        with torch.no_grad():
            first = capture_layer_inputs(model, views[0].module, calib, p.batch_size)
            kwargs = layer_kwargs(model, views, calib, p.batch_size, first)
        fp_in = [x for x, _ in first]
        q_in = [x.clone() for x in fp_in]
        del first
        layers, losses = [], []
        for l, view in enumerate(ctx.progress(views, desc="WKVQuant layers") if ctx.progress else views):
            with torch.no_grad(), KVRanges(view.attn, pre_rope_keys=False) as ranges:
                fp_out = run_layer(view.module, fp_in, kwargs[l])
            following = list(range(l + 1, min(l + 1 + p.crr_blocks, len(views))))
            with torch.no_grad():
                targets = fp_out
                for j in following:
                    targets = run_layer(views[j].module, targets, kwargs[j])
            learned, first_loss, last_loss = self._train_layer(view, views, following, kwargs, l, q_in, targets,
                                                               ranges, policy, wfmt)
            layers.append(learned)
            losses.append((first_loss, last_loss))
            with torch.no_grad(), self._quantized(view, learned, policy, wfmt):
                q_in = run_layer(view.module, q_in, kwargs[l])
            fp_in = fp_out
        meta = {"loss_first_mean": sum(a for a, _ in losses) / len(losses),
                "loss_last_mean": sum(b for _, b in losses) / len(losses), "crr_blocks": p.crr_blocks}
        return WKVQuantState(layers=layers, meta=meta)

    # ---- one layer ------------------------------------------------------------------------------
    def _train_layer(self, view, views, following, kwargs, l, q_in, targets, ranges, policy, wfmt):
        p = self.params
        weights = weight_roles(view) if wfmt is not None else {}
        names = {id(param): name for name, param in view.module.named_parameters()}
        clips = {role: torch.full(w.shape[:-1], CLIP_INIT, requires_grad=p.learn_clip) for role, w in weights.items()}
        smooth = {}
        for role in ROLES:
            shift, scale = smoothing_init(ranges.min[role], ranges.max[role]) if p.smoothing else (
                torch.zeros_like(ranges.min[role]), torch.ones_like(ranges.min[role]))
            smooth[role] = (shift.clone().requires_grad_(p.smoothing), scale.log().requires_grad_(p.smoothing))
        groups = [{"params": [c for c in clips.values() if c.requires_grad], "lr": p.lr_clip},
                  {"params": [t for pair in smooth.values() for t in pair if t.requires_grad], "lr": p.lr_smooth}]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, weight_decay=0.0) if groups else None

        def loss_of(b: int) -> torch.Tensor:
            wq = {names[id(w)]: clipped_fake_quant(w, wfmt, torch.sigmoid(clips[role])) for role, w in weights.items()}
            view.attn.kv_policy = policy
            view.attn.kv_codecs = {role: ChannelSmoothing(s, ls.exp()) for role, (s, ls) in smooth.items()}
            out = torch.func.functional_call(view.module, wq, (q_in[b],), kwargs[l][b])
            out = out[0] if isinstance(out, tuple) else out
            for j in following:
                out = views[j].module(out, **kwargs[j][b])
                out = out[0] if isinstance(out, tuple) else out
            return (out - targets[b]).abs().mean()

        history = []
        try:
            for _ in range(p.epochs if opt else 1):
                for b in range(len(q_in)):
                    with torch.enable_grad():
                        loss = loss_of(b)
                        if opt is not None:
                            opt.zero_grad()
                            loss.backward()
                            opt.step()
                    history.append(loss.item())
        finally:
            view.attn.kv_policy, view.attn.kv_codecs = None, None
        learned = {f"clip_{role}": torch.sigmoid(c).detach() for role, c in clips.items()}
        for role, (s, ls) in smooth.items():
            learned[f"{role}_shift"], learned[f"{role}_scale"] = s.detach(), ls.exp().detach()
        n = max(1, len(q_in))
        return learned, sum(history[:n]) / n, sum(history[-n:]) / n

    @staticmethod
    def _install(view, learned, policy, wfmt) -> None:
        with torch.no_grad():
            for role, w in (weight_roles(view) if wfmt is not None else {}).items():
                w.copy_(clipped_fake_quant(w, wfmt, learned[f"clip_{role}"]))
        view.attn.kv_policy = policy
        view.attn.kv_codecs = {role: ChannelSmoothing(learned[f"{role}_shift"], learned[f"{role}_scale"])
                               for role in ROLES}

    @contextlib.contextmanager
    def _quantized(self, view, learned, policy, wfmt):
        """The layer quantized as learned inside the block, then back to FP (calibration goes on from FP weights)."""
        saved = {role: w.detach().clone() for role, w in weight_roles(view).items()} if wfmt is not None else {}
        self._install(view, learned, policy, wfmt)
        try:
            yield
        finally:
            with torch.no_grad():
                for role, w in weight_roles(view).items():
                    if role in saved:
                        w.copy_(saved[role])
            view.attn.kv_policy, view.attn.kv_codecs = None, None

    # ---- apply ------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, model, adapter, state: WKVQuantState, scheme):
        from harness.quant import apply_scheme

        policy, wfmt = self.policy(scheme), getattr(scheme, "weight", None)
        apply_scheme(model, adapter, dataclasses.replace(scheme, kv=policy), quantize_weights=False)
        for view, learned in zip(adapter.layers(), state.layers):
            self._install(view, learned, policy, wfmt)
        self._metrics = {k: v for k, v in state.meta.items() if isinstance(v, float)}
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return getattr(self, "_metrics", {})
