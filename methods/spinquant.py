"""SpinQuant: LLM Quantization with Learned Rotations (Liu et al., ICLR 2025, arXiv 2405.16406).

R1 (residual, d x d) and one R2 per layer (head_dim x head_dim, v_proj output / o_proj input) are
learned end to end: the loss is the next-token cross-entropy of the rotated network with the cell's
scheme fake-quantizing activations and the KV cache in the loop (straight-through gradients), and
weights in 16 bits (the paper's GPTQ pipeline: "optimise for W16A4KV4, then GPTQ"; set
`weight_quant_in_loop` for the RTN pipeline, where weights are STE-quantized too). The optimiser is
Cayley SGD on the Stiefel manifold (harness.rotation.learn.CayleySGD, lr 1.5, cosine decay, 100 steps,
batch 8 windows of 2048 WikiText-2 tokens = the paper's 8 GPUs x batch 1). Init: random Hadamards.
R3 (online Hadamard on Q/K after RoPE) and R4 (online Hadamard before down_proj) are fixed, as in
QuaRot, and are in the training forward too. Then GPTQ (default) or RTN weights.

The training forward is the harness's own quantized model (apply_scheme) with R1/R2 folded into the
weights as differentiable functions of the rotations (torch.func.functional_call), so what is
optimised is exactly what is evaluated. Embedding rows are rotated after the lookup and lm_head's input
is rotated back (both exact, and far cheaper than rotating the vocabulary-sized tables each step).
"""
from __future__ import annotations

import copy
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt

from harness.errors import InvalidValueError
from harness.calib import MemoryMeter, page_in
from harness.method import CalibContext, scheme_to_dict
from harness.quant import ste_quantize
from harness.registry import register_method
from harness.rotation.install import Rotations, install_rotations
from harness.rotation.learn import CayleySGD, cosine_lr, orthogonality_error
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import hadamard, random_hadamard, random_orthogonal


def layer_seed(seed: int, index: int) -> int:
    """Seed of layer `index`'s R2 init (distinct from R1's seed and from other layers')."""
    return seed * 100_003 + 1 + index


class _Sandwich(torch.nn.Module):
    """Activation-form quantization site: x -> Q(x R) Rᵀ (R1 sites) or, on o_proj's input (already in
    the R2 basis, see `_rotate_values`), x -> Q(x) R2ᵀ per head. The unrotated weights then give what
    the rotated weights give in the weight form. q, k and v (gate and up) pass the same tensor: the
    result is reused instead of recomputed."""

    def __init__(self, owner: RotatedTrainingModel, fmt, layer: int | None = None):
        super().__init__()
        self.owner, self.fmt, self.layer = [owner], fmt, layer  # list: keep the owner out of the module tree
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        owner = self.owner[0]
        if self.layer is None:  # an R1 site
            r1 = owner.current[0]
            y = ste_quantize(x @ r1, self.fmt) @ r1.T
        else:  # o_proj input, per head
            r2 = owner.current[1][self.layer]
            q = ste_quantize(x, self.fmt) if self.fmt is not None else x
            y = (q.reshape(*x.shape[:-1], -1, owner.hd) @ r2.T).reshape(x.shape)
        self._last = (x, y)
        return y


class _Then(torch.nn.Module):
    """Two transforms in a row (an experts' R4, then the STE quantizer)."""

    def __init__(self, first, fmt):
        super().__init__()
        self.first, self.fmt = first, fmt

    def forward(self, x):
        return ste_quantize(self.first(x) if self.first is not None else x, self.fmt)


class RotatedTrainingModel:
    """A copy of the model in which R1 and per-layer R2 enter as differentiable inputs.

    Norms are folded, R3/R4 installed and the scheme's activation / KV quantizers installed; weights stay
    in full precision unless `weight_format` is given (then they are STE-quantized after rotation).
    `loss(r1, r2s, ids)` is the mean next-token cross-entropy; every quantizer of the copy (KV included)
    is straight-through, so it can be backpropagated. Two forms of the same function (equal up to float
    rounding, see the tests):

    * "weights" (SpinQuant's own): every reader/writer weight is rotated each step, W R1 / R1ᵀ W and R2
      per head (torch.func.functional_call). Cost per step ~ (decoder params x hidden), whatever the
      number of tokens; needed when weights are quantized in the loop.
    * "activations": weights untouched; each quantized input is rotated, quantized and rotated back
      (Q(x R1) R1ᵀ), values are rotated per head by R2 and o_proj's quantized input rotated back. Cost ~
      tokens x layers x 4 hidden², cheaper for the few tokens per step of CPU runs.
    """

    def __init__(self, model, scheme, qk: torch.Tensor | None, weight_format=None, form: str = "weights"):
        from harness.models import get_adapter
        from harness.quant import QuantExperts, apply_scheme, get_scheme, set_straight_through

        if form not in ("weights", "activations"):
            raise InvalidValueError("spinquant training form", form, "weights, activations")
        if form == "activations" and weight_format is not None:
            raise InvalidValueError("spinquant training form", form, "weights (weights quantized in the loop)")
        scheme = get_scheme(scheme)
        self.form = form
        get_adapter(model).require_direct_residual_writers("spinquant")
        self.model = copy.deepcopy(model)
        adapter = get_adapter(self.model)
        install_rotations(self.model, adapter, Rotations(qk=qk, down_kind="hadamard"))  # folds norms too
        self.weight_format = weight_format
        self.hd = adapter.head_dim
        self.current: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._sandwiches: list[_Sandwich] = []
        # (parameter, role, layer index); the base tensors are the folded, R4-fused weights
        sites: list[tuple[torch.nn.Parameter, str, int]] = []
        for layer in adapter.layers():
            i = layer.index
            sites += [(lin.weight, "in", i) for lin in (layer.q, layer.k, *layer.mlp_in)]
            sites += [(m.weight, "router", i) for m in layer.router_linears]
            sites.append((layer.v.weight, "v", i))
            if layer.v.bias is not None:
                sites.append((layer.v.bias, "v_bias", i))
            sites.append((layer.o.weight, "o", i))
            for lin in [layer.o, *layer.mlp_out]:
                if lin.bias is not None:
                    sites.append((lin.bias, "out_bias", i))
            sites += [(lin.weight, "out", i) for lin in layer.mlp_out]
            if layer.experts is not None:
                sites += [(layer.experts.gate_up, "in", i), (layer.experts.down, "out", i)]
        self.head_quantized = bool(scheme.lm_head)
        if self.head_quantized:
            sites.append((adapter.lm_head.weight, "head", -1))
        apply_scheme(self.model, adapter, scheme, quantize_weights=False)
        self.model.requires_grad_(False)
        set_straight_through(self.model)  # a training copy: every quantizer passes gradients straight through
        if form == "activations":
            self._install_sandwiches(adapter, scheme, QuantExperts)
            return
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.sites = [(names[id(p)], p.detach(), role, i) for p, role, i in sites]
        self.embed_rows_quantized = bool(scheme.embeddings) and weight_format is not None
        adapter.embed.register_forward_hook(self._rotate_embedding)
        if not self.head_quantized:
            adapter.lm_head.register_forward_pre_hook(self._unrotate_head_input)

    # ---- activation form -----------------------------------------------------------------------
    def _install_sandwiches(self, adapter, scheme, quant_experts_cls) -> None:
        fmt = scheme.activation
        if scheme.lm_head or scheme.embeddings:
            raise InvalidValueError("spinquant training form", "activations",
                                    "weights (the scheme quantizes lm_head / embeddings)")
        for layer in adapter.layers():
            layer.site("v").register_forward_hook(self._rotate_values)  # values in the R2 basis, KV sees them
            o = layer.site("o")
            o.act_format, o.input_transform = None, _Sandwich(self, fmt, layer.index)
            self._sandwiches.append(o.input_transform)
            if fmt is None:
                continue  # no activation quantizer: nothing between R1 and its inverse
            r1_sites = [layer.site(r) for r in ("q", "k", "v", "gate", "up", "shared_gate", "shared_up")
                        if r in layer.sites]
            shared = [_Sandwich(self, fmt), _Sandwich(self, fmt)]  # attention input, MLP input
            for k, wrapper in enumerate(r1_sites):
                wrapper.act_format, wrapper.input_transform = None, shared[0 if k < 3 else 1]
            experts = layer.experts.module if layer.experts is not None else None
            if isinstance(experts, quant_experts_cls):
                experts.act_format, experts.input_transform = None, shared[1]
                experts.down_transform = _Then(experts.down_transform, fmt)
            self._sandwiches += shared
        self._layer_of = {id(layer.site("v")): layer.index for layer in adapter.layers()}

    def _rotate_values(self, module, _args, out):
        r2 = self.current[1][self._layer_of[id(module)]]
        return (out.reshape(*out.shape[:-1], -1, self.hd) @ r2).reshape(out.shape)

    # ---- weight form -----------------------------------------------------------------------------
    # exact shortcuts for the vocabulary-sized tables: (E[ids]) R1 == (E R1)[ids]; x R1ᵀ Wᵀ == x (W R1)ᵀ
    def _rotate_embedding(self, _module, _args, out):
        y = out @ self.current[0]
        return ste_quantize(y, self.weight_format) if self.embed_rows_quantized else y

    def _unrotate_head_input(self, _module, args):
        return (args[0] @ self.current[0].T,)

    def _rotated(self, w: torch.Tensor, role: str, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        hd = self.hd
        if role in ("in", "router", "head"):
            out = w @ r1
        elif role == "out":
            out = r1.T @ w
        elif role == "out_bias":
            return w @ r1
        elif role == "v":  # rows of each KV head h: W_h <- R2ᵀ W_h, then the input side R1
            out = torch.einsum("ji,hjk->hik", r2, (w @ r1).reshape(-1, hd, w.shape[-1])).reshape(w.shape)
        elif role == "v_bias":
            return (w.reshape(-1, hd) @ r2).reshape(-1)
        elif role == "o":  # input columns of each head: W[:, h] <- W[:, h] R2, then the output side R1
            out = r1.T @ (w.reshape(w.shape[0], -1, hd) @ r2).reshape(w.shape)
        else:
            raise ValueError(role)
        if self.weight_format is not None and role != "router" and (role != "head" or self.head_quantized):
            out = ste_quantize(out, self.weight_format)
        return out

    def loss(self, r1: torch.Tensor, r2s: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        dtype = next(iter(self.model.parameters())).dtype
        r1 = r1.to(dtype)
        r2s = [r.to(dtype) for r in r2s]
        self.current = (r1, r2s)
        try:
            if self.form == "weights":
                params = {name: self._rotated(w, role, r1, r2s[i] if i >= 0 else None)
                          for name, w, role, i in self.sites}
                logits = torch.func.functional_call(self.model, params, (ids,), {"use_cache": False}).logits
            else:
                logits = self.model(ids, use_cache=False).logits
        finally:
            self.current = None
            for s in self._sandwiches:
                s._last = None
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@register_method("spinquant")
class SpinQuant(RotationMethod):
    """Learned R1 + per-layer R2 (Cayley SGD on the quantized network's cross-entropy), Hadamard R3/R4."""

    version = 1
    conformance_params = {"weight_solver": "rtn", "steps": 2, "samples": 2, "seqlen": 32, "batch_size": 2}

    class Params(RotationParams):
        steps: PositiveInt = 100
        lr: PositiveFloat = 1.5
        momentum: float = Field(0.0, ge=0, lt=1)  # SpinQuant's SGDG is used without momentum
        samples: PositiveInt | None = 800  # training windows; None: the cell's calibration windows
        seqlen: PositiveInt | None = 2048  # None: the cell's calibration seqlen
        batch_size: PositiveInt = 8
        train_r2: bool = True
        rotate_kv: bool = True  # R3 on Q/K
        weight_quant_in_loop: bool = False  # RTN pipeline: weights STE-quantized during training
        init: Literal["hadamard", "random"] = "hadamard"
        # how the rotations enter the training forward (same function, different cost; see RotatedTrainingModel)
        form: Literal["auto", "weights", "activations"] = "auto"

    def calib_scheme_key(self, scheme):
        return scheme_to_dict(scheme)  # activations / KV (and weights) are in the training loop

    def initial_rotations(self, ctx: CalibContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
        adapter, seed = ctx.adapter, ctx.seed
        make = random_hadamard if self.params.init == "hadamard" else random_orthogonal
        r1 = make(adapter.hidden_size, seed)
        r2s = [make(adapter.head_dim, layer_seed(seed, i)) for i in range(adapter.num_layers)]
        return r1, r2s

    def training_form(self, ctx: CalibContext, tokens_per_step: int) -> str:
        """`form`, or for "auto" the cheaper one: rotating the weights costs ~ hidden x (rotated weight
        elements) per step, rotating activations ~ tokens x layers x 4 hidden² (x R1, back, two sites)."""
        p = self.params
        if p.form != "auto":
            return p.form
        if p.weight_quant_in_loop or ctx.scheme.lm_head or ctx.scheme.embeddings:
            return "weights"
        d = ctx.adapter.hidden_size
        weight_cost = d * sum(w.numel() for w in ctx.adapter.weight_tensors().values())
        act_cost = tokens_per_step * ctx.adapter.num_layers * 4 * d * d
        return "activations" if act_cost < weight_cost else "weights"

    def training_model(self, ctx: CalibContext, form: str = "weights") -> RotatedTrainingModel:
        p = self.params
        qk = hadamard(ctx.adapter.head_dim) if p.rotate_kv else None
        wfmt = ctx.scheme.weight if p.weight_quant_in_loop else None
        return RotatedTrainingModel(ctx.model, ctx.scheme, qk, wfmt, form)

    def build(self, ctx: CalibContext) -> Rotations:
        p = self.params
        device = next(ctx.model.parameters()).device
        windows = ctx.training_windows(self.params.samples, self.params.seqlen).to(device)
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
        r1_init, r2_init = self.initial_rotations(ctx)
        t0 = time.perf_counter()
        losses = []
        page_in(ctx.model)
        with MemoryMeter(device) as mem, torch.enable_grad():
            form = self.training_form(ctx, p.batch_size * windows.shape[1])
            trainer = self.training_model(ctx, form)
            r1 = torch.nn.Parameter(r1_init.to(device))
            r2s = [torch.nn.Parameter(r.to(device), requires_grad=p.train_r2) for r in r2_init]
            trainable = [r1] + (r2s if p.train_r2 else [])
            opt = CayleySGD(trainable, lr=p.lr, momentum=p.momentum)
            steps = ctx.progress(range(p.steps), desc="SpinQuant steps") if ctx.progress else range(p.steps)
            for step in steps:
                picks = order[[(step * p.batch_size + j) % len(order) for j in range(p.batch_size)]]
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(p.lr, step, p.steps)
                loss = trainer.loss(r1, r2s, windows[picks])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            del trainer
        seconds = time.perf_counter() - t0
        r1_final = r1.detach().cpu().to(torch.float64)
        r2_final = [r.detach().cpu().to(torch.float64) for r in r2s]
        quarter = max(1, len(losses) // 4)  # means over the first / last quarter of the steps
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        metrics = {"loss_first": mean(losses[:quarter]), "loss_last": mean(losses[-quarter:]),
                   "rotation_seconds": round(seconds, 3), "rotation_peak_mb": round(mem.extra_bytes / 2**20, 1),
                   "steps": float(p.steps)}
        info = {"seed": ctx.seed, "init": p.init, "steps": p.steps, "form": form, "losses": losses,
                "peak_bytes": mem.extra_bytes, "peak_kind": mem.kind, "rotation_seconds": seconds,
                "windows": list(windows.shape),
                "orthogonality_error": max(orthogonality_error(r) for r in [r1_final, *r2_final]),
                "metrics": metrics}
        qk = hadamard(ctx.adapter.head_dim) if p.rotate_kv else None
        return Rotations(residual=r1_final, qk=qk, down_kind="hadamard", heads=r2_final, info=info)

    def objective(self, ctx: CalibContext, rot: Rotations, ids: torch.Tensor, form: str = "weights") -> float:
        """The training loss (quantized cross-entropy) of `rot` on `ids`, without gradients."""
        trainer = self.training_model(ctx, form)
        with torch.no_grad():
            return float(trainer.loss(rot.residual, [rot.head_of(i) for i in range(ctx.adapter.num_layers)], ids))
