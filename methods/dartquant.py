"""DartQuant: Efficient Rotational Distribution Calibration for LLM Quantization (Shao et al., NeurIPS 2025,
arXiv 2511.04063).

R1 (residual) and R2 (per layer, one per KV head) are fitted to cached activations, never by
backpropagating through the LLM:

1. One layer-by-layer pass of the calibration windows through the norm-folded FP model (the layer
   inputs of one layer at a time, as GPTQ does) records a random sample of tokens of every layer's
   RMSNorm outputs (the inputs of q/k/v and of the MLP / router / experts: R1's training set) and the
   o_proj inputs (the per-head attention outputs: R2's training set).
2. Each layer's R2 is fitted right after its pass (then its data is dropped); R1 at the end on the
   pooled residual samples.
3. Loss ("whip"): mean over tokens of Σ_i exp(−|(x R)_i|), which pushes rotated coordinates away from
   zero, i.e. spreads the energy evenly and shrinks the outliers (DartQuant's calibrater,
   r1_base_qr.py / r2_base_qr.py). `loss: quant_mse` instead minimises the scheme's activation
   quantization error of x R (any format: INT per token, MXFP4, NVFP4), the "recalibrate for this
   format" variant; it is not in the paper.
4. QR-Orth: R = QR(Z).Q (signs fixed), the latent Z trained by SGD with momentum 0.9
   (harness.rotation.learn.qr_orth). Init: random Hadamard (QuaRot's), per layer for R2.

Defaults are the paper's scripts: R1 10 epochs, batches of 64 x 2048 tokens, lr 1.5e-3 (README command),
10% of the tokens per epoch; R2 10 epochs, batches of 64 x 2048 tokens, gradient accumulation 2,
lr 1e-3. Differences: the 10% token subset is drawn once while collecting (`r1_token_fraction`) rather
than re-drawn every epoch (memory: the pooled set is kept in float16, not on disk), and gradient
accumulation counts batches across epochs (the script's per-epoch counter never steps when an epoch
has fewer batches than the accumulation count). Then R3/R4 fixed Hadamards as in QuaRot, GPTQ or RTN
weights.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from harness.calib import MemoryMeter, page_in, walk_layers
from harness.errors import InvalidValueError
from harness.method import CalibContext
from harness.registry import register_method
from harness.rotation.install import Rotations, fold_norms
from harness.rotation.learn import orthogonality_error, qr_orth
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import hadamard, random_hadamard

PAPER_BATCH_TOKENS = 64 * 2048


def whip_loss(y: torch.Tensor) -> torch.Tensor:
    """DartQuant's whip loss: mean over rows of Σ_i exp(−|y_i|).

    |y| is capped at 80 (exp(−80) ≈ 2e-35, below float32 resolution of any sum it enters): beyond that
    exp underflows to subnormal floats, which run up to 100x slower on CPUs."""
    return torch.exp(-y.abs().clamp(max=80.0)).sum(dim=-1).mean()


def quant_mse_loss(fmt):
    """Mean over rows of Σ_i (q(y)_i − y_i)²: the activation quantization error of the rotated rows.
    The rounding has no gradient; the gradient pulls each coordinate towards its grid point (and moves
    the scales where they are differentiable), which is a descent direction of this loss."""
    from harness.formats import quantize

    def loss(y: torch.Tensor) -> torch.Tensor:
        return (quantize(y, fmt) - y).pow(2).sum(dim=-1).mean()

    return loss


def max_to_rms(y: torch.Tensor) -> float:
    """Mean over rows of max|y| / rms(y): the outlier measure of a rotated activation."""
    y = y.float()
    return float((y.abs().amax(-1) / y.pow(2).mean(-1).sqrt().clamp_min(1e-12)).mean())


class TokenSampler:
    """Deterministic random subsets of token rows, in float16 (the pooled training sets)."""

    def __init__(self, fraction: float, seed: int):
        self.fraction = fraction
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        k = max(1, round(self.fraction * rows.shape[0]))
        if k >= rows.shape[0]:
            return rows.detach().to(torch.float16)
        idx = torch.randperm(rows.shape[0], generator=self.gen)[:k].to(rows.device)
        return rows[idx].detach().to(torch.float16)


def fit_qr(init: torch.Tensor, data: torch.Tensor, transform, loss_fn, *, epochs: int, batch_tokens: int,
           accumulation: int, lr: float, momentum: float, seed: int,
           chunk_tokens: int = 8192) -> tuple[torch.Tensor, list[float], int]:
    """Train latent Z (init: an orthogonal matrix, so R starts there) by SGD on loss_fn(transform(x, QR(Z))).

    Returns (R in float64, per-step losses, optimizer steps). `data` [tokens, features] (any float dtype)
    is shuffled each epoch and cut into batches of `batch_tokens` rows. A batch is processed in chunks of
    `chunk_tokens` rows whose gradients w.r.t. R add up to the batch's (loss_fn is a mean over rows), then
    flow once through the QR: the update is the batch's, the memory that of a chunk.
    """
    z = init.detach().to(device=data.device, dtype=torch.float32).clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    steps = batches = 0
    pending = 0.0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(data.shape[0], generator=gen).to(data.device)
            for start in range(0, data.shape[0], batch_tokens):
                rows = perm[start:start + batch_tokens]
                r = qr_orth(z)
                r_leaf = r.detach().requires_grad_(True)
                for c in range(0, len(rows), chunk_tokens):
                    x = data[rows[c:c + chunk_tokens]].to(torch.float32)
                    loss = loss_fn(transform(x, r_leaf)) * (x.shape[0] / len(rows) / accumulation)
                    loss.backward()
                    pending += float(loss.detach())
                r.backward(r_leaf.grad)  # accumulates into z.grad across the accumulation batches
                batches += 1
                if batches % accumulation == 0:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(pending)
                    pending = 0.0
                    steps += 1
    return qr_orth(z.detach().to(torch.float64)), losses, steps


def rotate_rows(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x @ r


def head_rotation(num_heads: int, head_dim: int):
    """x [tokens, heads * hd] -> per head x_h R[h // groups], for R [kv_heads, hd, hd] (or one [hd, hd])."""

    def transform(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(x.shape[0], num_heads, head_dim)
        if r.dim() == 2:
            return (heads @ r).reshape(x.shape)
        per_head = r.repeat_interleave(num_heads // r.shape[0], dim=0)  # [heads, hd, hd]
        return torch.einsum("nhd,hde->nhe", heads, per_head).reshape(x.shape)

    return transform


@register_method("dartquant")
class DartQuant(RotationMethod):
    """R1/R2 fitted to cached activations with the whip loss (QR-Orth + SGD), Hadamard R3/R4."""

    version = 1
    conformance_params = {"weight_solver": "rtn", "r1_epochs": 1, "r1_batch_tokens": 128, "r1_token_fraction": 0.5,
                          "r2_epochs": 1, "r2_batch_tokens": 128, "r2_accumulation": 1, "forward_batch": 4}

    class Params(RotationParams):
        r1_epochs: NonNegativeInt = 10
        r1_lr: PositiveFloat = 1.5e-3
        r1_batch_tokens: PositiveInt = PAPER_BATCH_TOKENS
        r1_token_fraction: float = Field(0.1, gt=0, le=1)
        r2_epochs: NonNegativeInt = 10
        r2_lr: PositiveFloat = 1e-3
        r2_batch_tokens: PositiveInt = PAPER_BATCH_TOKENS
        r2_accumulation: PositiveInt = 2
        r2_token_fraction: float = Field(1.0, gt=0, le=1)
        momentum: float = Field(0.9, ge=0, lt=1)
        train_r1: bool = True
        train_r2: bool = True
        r2_per_kv_head: bool = True
        loss: Literal["whip", "quant_mse"] = "whip"
        rotate_kv: bool = True  # R3 on Q/K
        forward_batch: PositiveInt = 8  # calibration windows per forward while collecting (speed/memory only)

    def calib_scheme_key(self, scheme):
        key = super().calib_scheme_key(scheme)
        if self.params.loss == "quant_mse":  # the activation format is in the loss
            act = getattr(scheme, "activation", None)
            key = {**(key or {}), "activation": act.to_dict() if act else None}
        return key

    def _loss_fn(self, ctx: CalibContext):
        if self.params.loss == "whip":
            return whip_loss
        fmt = ctx.scheme.activation
        if fmt is None:
            raise InvalidValueError("dartquant loss", "quant_mse", "a scheme with an activation format (or loss: whip)")
        return quant_mse_loss(fmt)

    def initial_rotations(self, ctx: CalibContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        adapter, seed = ctx.adapter, ctx.seed
        kv = adapter.attention.num_kv_heads if self.params.r2_per_kv_head else 1
        r1 = random_hadamard(adapter.hidden_size, seed)
        r2 = []
        for i in range(adapter.num_layers):
            base = random_hadamard(adapter.head_dim, seed * 100_003 + 1 + i)
            r2.append(base.expand(kv, -1, -1).clone() if self.params.r2_per_kv_head else base)
        return r1, r2

    def build(self, ctx: CalibContext) -> Rotations:
        from harness.models import get_adapter

        p = self.params
        loss_fn = self._loss_fn(ctx)
        device = next(ctx.model.parameters()).device
        calib = ctx.calib_inputs()
        r1_init, r2_init = self.initial_rotations(ctx)
        geometry = ctx.adapter.attention
        heads_fn = head_rotation(geometry.num_heads, geometry.head_dim)
        t0 = time.perf_counter()
        r2_final, r2_losses, steps = [], [], 0
        r1_sampler = TokenSampler(p.r1_token_fraction, ctx.seed)
        r2_sampler = TokenSampler(p.r2_token_fraction, ctx.seed + 1)
        page_in(ctx.model)
        with MemoryMeter(device) as mem, torch.no_grad():
            # The cell's model is only read: the norm outputs are divided by the norm scales, which gives
            # exactly what the norm-folded model's readers see (x / rms(x)) without copying the model.
            model, adapter = ctx.model, ctx.adapter
            if any((norm.weight == 0).any() for v in adapter.layers() for norm in (v.attn_norm, v.mlp_norm)):
                model = copy.deepcopy(ctx.model)  # a zero scale cannot be divided out: fold a copy
                adapter = get_adapter(model)
                fold_norms(adapter)
            residual: list[torch.Tensor] = []

            def take_normed(norm, _args, out):
                residual.append(r1_sampler(out / norm.weight))

            for step in walk_layers(model, adapter, calib, p.forward_batch, progress=ctx.progress,
                                    desc="DartQuant layers"):
                view = step.view
                o_inputs: list[torch.Tensor] = []
                handles = [
                    view.attn_norm.register_forward_hook(take_normed),
                    view.mlp_norm.register_forward_hook(take_normed),
                    view.site("o").register_forward_pre_hook(lambda _m, args: o_inputs.append(r2_sampler(args[0]))),
                ]
                try:
                    step.run()
                finally:
                    for h in handles:
                        h.remove()
                init = r2_init[view.index].to(device)
                if p.train_r2:
                    data = torch.cat(o_inputs)
                    del o_inputs
                    r2, losses, n = fit_qr(init, data, heads_fn, loss_fn, epochs=p.r2_epochs,
                                           batch_tokens=p.r2_batch_tokens, accumulation=p.r2_accumulation,
                                           lr=p.r2_lr, momentum=p.momentum, seed=ctx.seed + 2 + view.index)
                    r2_losses.append((losses[0], losses[-1]) if losses else (math.nan, math.nan))
                    steps += n
                    del data
                else:
                    r2 = init.to(torch.float64)
                r2_final.append(r2.cpu())
            del model
            pooled = torch.cat(residual)
            del residual
            with torch.no_grad():
                r1_init_dev = r1_init.to(device=device, dtype=torch.float32)
                probe = pooled[: min(len(pooled), 65536)].float()
                before = {"whip": float(whip_loss(probe @ r1_init_dev)), "max_to_rms": max_to_rms(probe @ r1_init_dev)}
            if p.train_r1:
                r1, r1_losses, n = fit_qr(r1_init.to(device), pooled, rotate_rows, loss_fn, epochs=p.r1_epochs,
                                          batch_tokens=p.r1_batch_tokens, accumulation=1, lr=p.r1_lr,
                                          momentum=p.momentum, seed=ctx.seed + 1_000_003)
                steps += n
            else:
                r1, r1_losses = r1_init.to(device), []
            with torch.no_grad():
                r1_dev = r1.to(device=device, dtype=torch.float32)
                after = {"whip": float(whip_loss(probe @ r1_dev)), "max_to_rms": max_to_rms(probe @ r1_dev)}
            pooled_tokens, pooled_bytes = pooled.shape[0], pooled.numel() * pooled.element_size()
            del pooled, probe
        seconds = time.perf_counter() - t0
        r1 = r1.detach().cpu().to(torch.float64)
        metrics = {"r1_whip_init": before["whip"], "r1_whip_final": after["whip"],
                   "r1_max_to_rms_init": before["max_to_rms"], "r1_max_to_rms_final": after["max_to_rms"],
                   "rotation_seconds": round(seconds, 3), "rotation_peak_mb": round(mem.extra_bytes / 2**20, 1),
                   "steps": float(steps)}
        if r2_losses:
            metrics["r2_loss_first_mean"] = sum(a for a, _ in r2_losses) / len(r2_losses)
            metrics["r2_loss_last_mean"] = sum(b for _, b in r2_losses) / len(r2_losses)
        info = {"seed": ctx.seed, "steps": steps, "r1_losses": r1_losses, "r2_losses": r2_losses,
                "peak_bytes": mem.extra_bytes, "peak_kind": mem.kind, "rotation_seconds": seconds,
                "pooled_tokens": pooled_tokens, "pooled_bytes": pooled_bytes, "loss": p.loss,
                "orthogonality_error": max(orthogonality_error(r) for r in [r1, *r2_final]),
                "metrics": metrics}
        qk = hadamard(geometry.head_dim) if p.rotate_kv else None
        return Rotations(residual=r1, qk=qk, down_kind="hadamard", heads=r2_final, info=info)

