"""OSTQuant: Refining LLM Quantization with Orthogonal and Scaling Transformations (Hu et al., ICLR 2025,
arXiv 2501.13987; code github.com/BrotherHappy/OSTQuant).

Learnable equivalent transforms, all merged into the weights after training:
* R1 (residual, d x d) and one R2 per layer (head_dim x head_dim on every head's values and the matching
  o_proj input), orthogonal, on the Stiefel manifold. Init as the official run (`--use_klt`): R1 = KLT x
  random Hadamard, the KLT being the eigenvectors (largest first) of the covariance of the centred rows of
  every residual reader (q, k, v, gate, up, norm scales folded; data-free); R2 random Hadamard.
* Per-channel scalings, init 1: S_attn / S_mlp between each RMSNorm and its readers (norm scale <- 1/s in
  the rotated basis, readers' columns x s; MoE routers too, kept in full precision), S_qk per KV head
  (k_proj rows x s, q_proj rows / s; one value per RoPE pair (i, i + hd/2), so it commutes with RoPE and
  cancels in q·k), S_ov per KV head between v_proj's output and o_proj's input (v rows / s, o columns x
  s, after R2), S_up_down between up_proj's output and down_proj's input (up rows / s, down columns x s,
  before the online Hadamard), per expert for routed experts.
* Fixed: R3 (online Hadamard on Q and K after RoPE, when the KV cache is quantized) and R4 (online
  Hadamard before down_proj, the official `online_hadamard=down`).

Optimiser as the official code: geoopt's Riemannian Adam, rotations as Stiefel manifold parameters
(lr 0.0161) and the scalings as Euclidean parameters of the same Adam (lr 1.79e-3), cosine decay, 100
steps. `optimizer: cayley_sgd` keeps SpinQuant's Cayley SGD for the rotations and SGD with momentum for
the scalings (the ablation; set `rotate_lr` to SpinQuant's 1.5 with it).

Objective: the KL-Top loss, KL between the FP model's and the transformed, fake-quantized model's
next-token distributions restricted to the FP model's top-k tokens (k = 1000). Default as the official
run (`post_attn=True`): full-vocabulary log-softmax gathered at the top-k indices; `kl_renormalize`
renormalises both over the k tokens instead. The cell's scheme fake-quantizes activations and KV in the
loop (straight-through gradients; weights too with `weight_quant_in_loop`, the official W4A16 setting),
so re-calibrating for MXFP4 / NVFP4 is a scheme, not a fork. Training forward = the harness's quantized
model with every transformed weight a differentiable function of R1, R2 and the scalings
(torch.func.functional_call), as in methods/spinquant.py. Then GPTQ (default, with w_clip) or RTN weights.

Deviations: the official repository was not in the searchable store; the optimiser, learning rates and
KLT construction follow the fidelity audit of issue #12 and a derived repository (liuyt929/
quantization-evaluation). S_qk is skipped on models with QK-norm (a row scaling before the norm does not
cancel; Qwen3) or partial RoPE, and recorded as skipped in the run's info. Likely effect: small.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt

from harness.affine import scale_input_columns, scale_output_rows, scale_vector
from harness.affine_train import OSTTrainingModel, qk_row_scale
from harness.calib import MemoryMeter, page_in
from harness.method import CalibContext, scheme_to_dict
from harness.registry import register_method
from harness.rotation.install import Rotations, install_rotations
from harness.rotation.learn import CayleySGD, cosine_lr, orthogonality_error
from harness.rotation.method import RotationMethod, RotationParams, RotationState
from harness.transforms import hadamard, random_hadamard, random_orthogonal


def layer_seed(seed: int, index: int) -> int:
    return seed * 100_003 + 1 + index


def kl_top(student: torch.Tensor, teacher: torch.Tensor, k: int, renormalize: bool = False) -> torch.Tensor:
    """Mean over positions of KL(p_FP ‖ p_Q) over the FP model's top-k tokens (see the module docstring)."""
    t, s = teacher.float(), student.float()
    k = min(k, t.shape[-1])
    top_v, top_i = t.topk(k, dim=-1)
    if renormalize:
        logp, logq = F.log_softmax(top_v, -1), F.log_softmax(s.gather(-1, top_i), -1)
    else:
        logp, logq = F.log_softmax(t, -1).gather(-1, top_i), F.log_softmax(s, -1).gather(-1, top_i)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


# ---- scalings: what they are and how they are merged ---------------------------------------------------


def qk_scaling_applies(adapter) -> str | None:
    """None when S_qk can be merged exactly on this model, else why not."""
    g = adapter.attention
    if g.qk_norm is not None:
        return f"QK-norm ({g.qk_norm}) sits between q/k_proj and the dot product"
    if g.rotary_dim != g.head_dim or g.head_dim % 2:
        return f"partial RoPE (rotary_dim {g.rotary_dim} of head_dim {g.head_dim})"
    return None


def initial_scales(adapter, params) -> list[dict[str, torch.Tensor]]:
    """Per layer {name: ones}: attn [d], mlp [d], qk [kv_heads, hd / 2], ov [kv_heads, hd], ud [dense
    intermediate], eud [E, I]."""
    out = []
    for view in adapter.layers():
        s = {}
        if params.smooth_norm_linear:
            s["attn"] = torch.ones(adapter.hidden_size)
            s["mlp"] = torch.ones(adapter.hidden_size)
        if params.smooth_qk and qk_scaling_applies(adapter) is None:
            s["qk"] = torch.ones(adapter.attention.num_kv_heads, adapter.head_dim // 2)
        if params.smooth_ov:
            s["ov"] = torch.ones(adapter.attention.num_kv_heads, adapter.head_dim)
        if params.smooth_up_down:
            if view.dense_mlp is not None:
                s["ud"] = torch.ones(view.mlp_out[0].in_features)
            if view.experts is not None:
                s["eud"] = torch.ones(view.experts.num_experts, view.experts.intermediate_size)
        out.append(s)
    return out


def install_ost(model, adapter, rot: Rotations, scales: list[dict[str, torch.Tensor]]) -> None:
    """Merge the scalings and the rotations into the model (in place); with quantizers off the function is
    unchanged. Up/down scalings go in before the R4 Hadamard is fused, the others after the rotations."""
    geometry = adapter.attention
    for view in adapter.layers():
        s = scales[view.index] if view.index < len(scales) else {}
        if "ud" in s:
            up = view.mlp_in[1]
            scale_output_rows(up.weight, 1.0 / s["ud"].double(), up.bias)
            scale_input_columns(view.mlp_out[0].weight, s["ud"])
        if "eud" in s:
            inter = view.experts.intermediate_size
            scale_output_rows(view.experts.gate_up.data[:, inter:], 1.0 / s["eud"].double())
            scale_input_columns(view.experts.down, s["eud"].unsqueeze(1))
    install_rotations(model, adapter, rot)
    for view in adapter.layers():
        s = scales[view.index] if view.index < len(scales) else {}
        if "attn" in s:
            scale_vector(view.attn_norm.weight, 1.0 / s["attn"].double())
            for lin in (view.q, view.k, view.v):
                scale_input_columns(lin.weight, s["attn"])
        if "mlp" in s:
            scale_vector(view.mlp_norm.weight, 1.0 / s["mlp"].double())
            for w in [lin.weight for lin in view.mlp_in] + [m.weight for m in view.router_linears]:
                scale_input_columns(w, s["mlp"])
            if view.experts is not None:
                scale_input_columns(view.experts.gate_up, s["mlp"])
        if "qk" in s:
            k_rows = qk_row_scale(s["qk"].double())
            q_rows = qk_row_scale(s["qk"].double(), geometry.kv_groups)
            scale_output_rows(view.k.weight, k_rows, view.k.bias)
            scale_output_rows(view.q.weight, 1.0 / q_rows, view.q.bias)
        if "ov" in s:
            ov = s["ov"].double()
            scale_output_rows(view.v.weight, 1.0 / ov.reshape(-1), view.v.bias)
            scale_input_columns(view.o.weight, ov.repeat_interleave(geometry.kv_groups, dim=0).reshape(-1))


def reader_klt(adapter) -> torch.Tensor:
    """[d, d] eigenvectors (largest eigenvalue first) of the covariance of the centred rows of every
    residual reader (q, k, v, gate, up; each norm's scale folded in), fp64: the official `klt_R_res`."""
    d = adapter.hidden_size
    cov = torch.zeros(d, d, dtype=torch.float64)
    for view in adapter.layers():
        for norm, readers in ((view.attn_norm, (view.q, view.k, view.v)), (view.mlp_norm, view.mlp_in)):
            gamma = norm.weight.detach().double()
            for lin in readers:
                rows = lin.weight.detach().double() * gamma
                rows = rows - rows.mean(dim=0, keepdim=True)
                cov += rows.T @ rows
    _, vectors = torch.linalg.eigh(cov)
    return vectors.flip(-1)


def rotation_optimizers(rotations, scale_params, p) -> list[tuple[torch.optim.Optimizer, dict[int, float]]]:
    """(optimizer, {param group index: base lr}) pairs for the chosen `optimizer`."""
    if p.optimizer == "radam":
        from geoopt.optim import RiemannianAdam

        groups, bases = [], {}
        if rotations:
            groups.append({"params": rotations, "lr": p.rotate_lr})
            bases[len(groups) - 1] = p.rotate_lr
        if scale_params:
            groups.append({"params": scale_params, "lr": p.scale_lr})
            bases[len(groups) - 1] = p.scale_lr
        return [(RiemannianAdam(groups), bases)] if groups else []
    out = []
    if rotations:
        out.append((CayleySGD(rotations, lr=p.rotate_lr), {0: p.rotate_lr}))
    if scale_params:
        out.append((torch.optim.SGD(scale_params, lr=p.scale_lr, momentum=p.scale_momentum), {0: p.scale_lr}))
    return out


def rotation_parameter(value: torch.Tensor, trainable: bool, optimizer: str) -> torch.nn.Parameter:
    """A trainable orthogonal matrix: a Stiefel ManifoldParameter for Riemannian Adam, a plain one for Cayley SGD."""
    if optimizer == "radam" and trainable:
        from geoopt import ManifoldParameter, Stiefel

        return ManifoldParameter(value, manifold=Stiefel(), requires_grad=True)
    return torch.nn.Parameter(value, requires_grad=trainable)


# ---- the method ---------------------------------------------------------------------------------------------


class OSTQuantParams(RotationParams):  # weight_solver (default gptq), gptq_damp, gptq_block_size
    steps: PositiveInt = 100
    batch_size: PositiveInt = 32  # official: 4 per GPU x 8 GPUs
    samples: PositiveInt | None = None  # training windows; None: the cell's calibration windows
    seqlen: PositiveInt | None = None
    optimizer: Literal["radam", "cayley_sgd"] = "radam"  # official: geoopt Riemannian Adam (see the docstring)
    rotate_lr: PositiveFloat = 0.0161
    scale_lr: PositiveFloat = 1.79e-3
    scale_momentum: float = Field(0.9, ge=0, lt=1)  # cayley_sgd only (SGD on the scalings)
    top_k: PositiveInt = 1000
    kl_renormalize: bool = False
    train_r1: bool = True
    train_r2: bool = True
    train_scales: bool = True
    smooth_norm_linear: bool = True
    smooth_qk: bool = True
    smooth_ov: bool = True
    smooth_up_down: bool = True
    rotate_kv: bool = True  # R3 on Q/K
    weight_quant_in_loop: bool = False
    init: Literal["klt", "hadamard", "random"] = "klt"  # R1's init (R2: Hadamard, or random with "random")


@dataclass(kw_only=True)
class OSTState(RotationState):
    """R1, the R2s, R3 (and R4 = "hadamard") as `rotations`, plus per layer the learned scalings
    {"attn", "mlp": [d], "ov": [kv_heads, hd], "ud": [dense intermediate], "eud": [E, I]} (float64)."""

    scales: list[dict[str, torch.Tensor]] = field(default_factory=list)


@register_method("ostquant")
class OSTQuant(RotationMethod):
    """Learned R1/R2 + per-channel scalings (KL-Top loss), Hadamard R3/R4, then GPTQ or RTN."""

    version = 2  # 2: Riemannian Adam (official), KLT init, S_qk
    Params = OSTQuantParams
    state_type = OSTState
    conformance_params = {"weight_solver": "rtn", "steps": 2, "batch_size": 2, "samples": 2, "top_k": 16}

    def calib_scheme_key(self, scheme):
        return scheme_to_dict(scheme)  # activations / KV (and weights) are in the training loop

    def initial(self, ctx: CalibContext):
        """(R1, [R2 per layer], scalings) at init."""
        adapter, seed = ctx.adapter, ctx.seed
        make = random_orthogonal if self.params.init == "random" else random_hadamard
        r1 = make(adapter.hidden_size, seed)
        if self.params.init == "klt":
            r1 = reader_klt(adapter) @ r1
        r2s = [make(adapter.head_dim, layer_seed(seed, i)) for i in range(adapter.num_layers)]
        return r1, r2s, initial_scales(adapter, self.params)

    def _qk(self, ctx):
        kv = getattr(ctx.scheme, "kv", None)
        return hadamard(ctx.adapter.head_dim) if self.params.rotate_kv and kv is not None else None

    def training_model(self, ctx: CalibContext) -> OSTTrainingModel:
        wfmt = getattr(ctx.scheme, "weight", None) if self.params.weight_quant_in_loop else None
        return OSTTrainingModel(ctx.model, ctx.scheme, self._qk(ctx), wfmt)

    def calibrate(self, ctx: CalibContext) -> OSTState:
        p = self.params
        device = next(ctx.model.parameters()).device
        windows = ctx.training_windows(self.params.samples, self.params.seqlen).to(device)
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
        r1_init, r2_init, s_init = self.initial(ctx)
        t0 = time.perf_counter()
        losses = []
        page_in(ctx.model)
        with MemoryMeter(device) as mem, torch.enable_grad():
            trainer = self.training_model(ctx)  # its quantizers are straight-through in its forward
            r1 = rotation_parameter(r1_init.to(device), p.train_r1, p.optimizer)
            r2s = [rotation_parameter(r.to(device), p.train_r2, p.optimizer) for r in r2_init]
            scales = [{k: torch.nn.Parameter(v.to(device), requires_grad=p.train_scales) for k, v in s.items()}
                      for s in s_init]
            rotations = ([r1] if p.train_r1 else []) + (r2s if p.train_r2 else [])
            scale_params = [v for s in scales for v in s.values()] if p.train_scales else []
            opts = rotation_optimizers(rotations, scale_params, p)
            bs = p.batch_size
            steps = ctx.progress(range(p.steps), desc="OSTQuant steps") if ctx.progress else range(p.steps)
            for step in steps:
                picks = order[[(step * bs + j) % len(order) for j in range(bs)]]
                ids = windows[picks]
                with torch.no_grad():
                    teacher = ctx.model(ids, use_cache=False).logits
                loss = kl_top(trainer.logits(r1, r2s, scales, ids), teacher, p.top_k, p.kl_renormalize)
                for opt, bases in opts:
                    for index, base in bases.items():
                        opt.param_groups[index]["lr"] = cosine_lr(base, step, p.steps)
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt, _ in opts:
                    opt.step()
                losses.append(float(loss.detach()))
            del trainer
        seconds = time.perf_counter() - t0
        r1_final = r1.detach().cpu().to(torch.float64)
        r2_final = [r.detach().cpu().to(torch.float64) for r in r2s]
        s_final = [{k: v.detach().cpu().to(torch.float64) for k, v in s.items()} for s in scales]
        quarter = max(1, len(losses) // 4)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        spread = [float((v - 1).abs().max()) for s in s_final for v in s.values()]
        metrics = {"loss_first": mean(losses[:quarter]), "loss_last": mean(losses[-quarter:]),
                   "transform_seconds": round(seconds, 3), "transform_peak_mb": round(mem.extra_bytes / 2**20, 1),
                   "steps": float(p.steps), "scale_max_change": max(spread) if spread else 0.0}
        info = {"seed": ctx.seed, "init": p.init, "optimizer": p.optimizer, "steps": p.steps, "losses": losses,
                "s_qk": "trained" if any("qk" in s for s in s_final) else f"skipped: {qk_scaling_applies(ctx.adapter)}"
                if p.smooth_qk else "off", "peak_bytes": mem.extra_bytes,
                "peak_kind": mem.kind, "windows": list(windows.shape),
                "orthogonality_error": max(orthogonality_error(r) for r in [r1_final, *r2_final]), "metrics": metrics}
        rot = Rotations(residual=r1_final, qk=self._qk(ctx), down_kind="hadamard", heads=r2_final)
        meta = {"steps": p.steps, "calib_peak_bytes": mem.extra_bytes, "info": info}
        weights = self.solve_weights(ctx, lambda work, adapter: install_ost(work, adapter, rot, s_final), meta)
        return OSTState(rotations=rot, scales=s_final, weights=weights, meta=meta)

    def install(self, model, adapter, state: OSTState) -> None:
        install_ost(model, adapter, state.rotations, state.scales)

    def objective(self, ctx: CalibContext, r1, r2s, scales, ids) -> float:
        """The training loss (KL-Top of the quantized model) at the given transforms, without gradients."""
        trainer = self.training_model(ctx)
        with torch.no_grad():
            teacher = ctx.model(ids, use_cache=False).logits
            student = trainer.logits(r1, r2s, scales, ids)
        return float(kl_top(student, teacher, self.params.top_k, self.params.kl_renormalize))
