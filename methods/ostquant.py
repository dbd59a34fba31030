"""OSTQuant: Refining LLM Quantization with Orthogonal and Scaling Transformations (Hu et al., ICLR 2025,
arXiv 2501.13987).

Learnable equivalent transforms, all merged into the weights after training:
* R1 (residual, d x d) and one R2 per layer (head_dim x head_dim on every head's values and the matching
  o_proj input), orthogonal, init random Hadamard, trained with Cayley SGD on the Stiefel manifold
  (harness.rotation.learn.CayleySGD; OSTQuant's code uses Riemannian Adam/SGD from geoopt — same manifold,
  another optimiser).
* Per-channel scalings, init 1, trained with SGD + momentum (paper-derived defaults lr 1.79e-3,
  momentum 0.9): S_attn / S_mlp between each RMSNorm and its readers (norm scale <- 1/s in the rotated
  basis, readers' columns x s; MoE routers too, kept in full precision), S_ov per KV head between
  v_proj's output and o_proj's input (v rows / s, o columns x s, after R2), S_up_down between up_proj's
  output and down_proj's input (up rows / s, down columns x s, before the online Hadamard), per expert
  for routed experts. S_qk (q/k rows) is not implemented: with RoPE it must be tied across rotary pairs
  and it conflicts with Qwen3's QK-norm; K is already rotated by the R3 Hadamard.
* Fixed: R3 (online Hadamard on Q and K after RoPE, when the KV cache is quantized) and R4 (online
  Hadamard before down_proj, the official `online_hadamard=down`).

Objective: the KL-Top loss, KL between the FP model's and the transformed, fake-quantized model's
next-token distributions restricted to the FP model's top-k tokens (k = 1000). Default as the official
run (`post_attn=True`): full-vocabulary log-softmax gathered at the top-k indices; `kl_renormalize`
renormalises both over the k tokens instead. The cell's scheme fake-quantizes activations and KV in the
loop (straight-through gradients; weights too with `weight_quant_in_loop`, the official W4A16 setting),
so re-calibrating for MXFP4 / NVFP4 is a scheme, not a fork. Training forward = the harness's quantized
model with every transformed weight a differentiable function of R1, R2 and the scalings
(torch.func.functional_call), as in methods/spinquant.py. Then GPTQ (default) or RTN weights.
"""
from __future__ import annotations

import copy
import time
from typing import Literal

import torch
import torch.nn.functional as F

from harness.affine import scale_input_columns, scale_output_rows, scale_vector
from harness.errors import InvalidValueError
from harness.method import CalibContext, State, scheme_to_dict
from harness.registry import register_method
from harness.rotation.install import Rotations, fold_norms, install_rotations
from harness.rotation.learn import (
    CayleySGD,
    MemoryMeter,
    cosine_lr,
    orthogonality_error,
    page_in,
    ste_quantize,
    straight_through_quantizers,
)
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import (
    hadamard,
    hadamard_transform,
    random_hadamard,
    random_orthogonal,
)

SCALE_PREFIX = "ost."


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


def initial_scales(adapter, params) -> list[dict[str, torch.Tensor]]:
    """Per layer {name: ones}: attn [d], mlp [d], ov [kv_heads, hd], ud [dense intermediate], eud [E, I]."""
    out = []
    for view in adapter.layers():
        s = {}
        if params.smooth_norm_linear:
            s["attn"] = torch.ones(adapter.hidden_size)
            s["mlp"] = torch.ones(adapter.hidden_size)
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
        if "ov" in s:
            ov = s["ov"].double()
            scale_output_rows(view.v.weight, 1.0 / ov.reshape(-1), view.v.bias)
            scale_input_columns(view.o.weight, ov.repeat_interleave(geometry.kv_groups, dim=0).reshape(-1))


def scales_to_tensors(scales) -> dict[str, torch.Tensor]:
    return {f"{SCALE_PREFIX}{i}.{k}": v.detach().to(torch.float64).contiguous()
            for i, s in enumerate(scales) for k, v in s.items()}


def scales_from_tensors(tensors, num_layers: int) -> list[dict[str, torch.Tensor]]:
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    for key, value in tensors.items():
        if key.startswith(SCALE_PREFIX):
            index, name = key[len(SCALE_PREFIX):].split(".")
            out[int(index)][name] = value
    return out


# ---- the training model ----------------------------------------------------------------------------------


class OSTTrainingModel:
    """A copy of the model whose transformed weights are differentiable functions of R1, the R2s and the
    scalings. Norms folded, R3/R4 and the scheme's activation / KV quantizers installed; weights in full
    precision unless `weight_format` (then STE-quantized after the transforms)."""

    def __init__(self, model, scheme, qk: torch.Tensor | None, weight_format=None):
        from harness.models import get_adapter
        from harness.quant import apply_scheme, get_scheme

        scheme = get_scheme(scheme)
        if scheme.embeddings:
            raise InvalidValueError("scheme for ostquant training", scheme.name, "one that keeps embeddings in FP")
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
            sites += [(view.q.weight, "qk", i), (view.k.weight, "qk", i), (view.v.weight, "v", i),
                      (view.o.weight, "o", i), (view.attn_norm.weight, "attn_norm", i),
                      (view.mlp_norm.weight, "mlp_norm", i)]
            if view.v.bias is not None:
                sites.append((view.v.bias, "v_bias", i))
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
        if role == "v_bias":
            b = w.reshape(-1, self.hd) @ r2
            return (b / s["ov"] if "ov" in s else b).reshape(-1)
        if role == "up_bias":
            return w / s["ud"] if "ud" in s else w
        if role in ("qk", "v", "gate", "up", "router", "e_gate_up", "head"):
            out = w @ r1
            key = "attn" if role in ("qk", "v") else None if role == "head" else "mlp"
            if key in s:
                out = out * s[key]
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
        dtype = next(iter(self.model.parameters())).dtype
        r1 = r1.to(dtype)
        self.current = r1
        try:
            params = {}
            for name, w, role, i in self.sites:
                s = {k: v.to(dtype) for k, v in scales[i].items()} if i >= 0 else {}
                params[name] = self._param(w, role, r1, r2s[i].to(dtype) if i >= 0 else None, s)
            return torch.func.functional_call(self.model, params, (ids,), {"use_cache": False}).logits
        finally:
            self.current = None


# ---- the method ---------------------------------------------------------------------------------------------


class OSTQuantParams(RotationParams):  # weight_solver (default gptq), gptq_damp, gptq_block_size
    steps: int = 100
    batch_size: int = 32  # official: 4 per GPU x 8 GPUs
    samples: int | None = None  # training windows; None: the cell's calibration windows
    seqlen: int | None = None
    rotate_lr: float = 1.5  # Cayley SGD (SpinQuant's value; see the module docstring)
    scale_lr: float = 1.79e-3
    scale_momentum: float = 0.9
    top_k: int = 1000
    kl_renormalize: bool = False
    train_r1: bool = True
    train_r2: bool = True
    train_scales: bool = True
    smooth_norm_linear: bool = True
    smooth_ov: bool = True
    smooth_up_down: bool = True
    rotate_kv: bool = True  # R3 on Q/K
    weight_quant_in_loop: bool = False
    init: Literal["hadamard", "random"] = "hadamard"


@register_method("ostquant")
class OSTQuant(RotationMethod):
    """Learned R1/R2 + per-channel scalings (KL-Top loss), Hadamard R3/R4, then GPTQ or RTN."""

    version = 1
    Params = OSTQuantParams

    def calib_scheme_key(self, scheme):
        return scheme_to_dict(scheme)  # activations / KV (and weights) are in the training loop

    def initial(self, ctx: CalibContext):
        """(R1, [R2 per layer], scalings) at init."""
        adapter, seed = ctx.adapter, ctx.seed
        make = random_hadamard if self.params.init == "hadamard" else random_orthogonal
        r1 = make(adapter.hidden_size, seed)
        r2s = [make(adapter.head_dim, layer_seed(seed, i)) for i in range(adapter.num_layers)]
        return r1, r2s, initial_scales(adapter, self.params)

    def _qk(self, ctx):
        kv = getattr(ctx.scheme, "kv", None)
        return hadamard(ctx.adapter.head_dim) if self.params.rotate_kv and kv is not None else None

    def training_model(self, ctx: CalibContext) -> OSTTrainingModel:
        wfmt = getattr(ctx.scheme, "weight", None) if self.params.weight_quant_in_loop else None
        return OSTTrainingModel(ctx.model, ctx.scheme, self._qk(ctx), wfmt)

    def calibrate(self, ctx: CalibContext) -> State:
        p = self.params
        device = next(ctx.model.parameters()).device
        windows = ctx.training_windows(self.params.samples, self.params.seqlen).to(device)
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(ctx.seed))
        r1_init, r2_init, s_init = self.initial(ctx)
        t0 = time.perf_counter()
        losses = []
        page_in(ctx.model)
        with MemoryMeter(device) as mem, torch.enable_grad(), straight_through_quantizers():
            trainer = self.training_model(ctx)
            r1 = torch.nn.Parameter(r1_init.to(device), requires_grad=p.train_r1)
            r2s = [torch.nn.Parameter(r.to(device), requires_grad=p.train_r2) for r in r2_init]
            scales = [{k: torch.nn.Parameter(v.to(device), requires_grad=p.train_scales) for k, v in s.items()}
                      for s in s_init]
            rotations = ([r1] if p.train_r1 else []) + (r2s if p.train_r2 else [])
            scale_params = [v for s in scales for v in s.values()] if p.train_scales else []
            opts = []
            if rotations:
                opts.append((CayleySGD(rotations, lr=p.rotate_lr), p.rotate_lr))
            if scale_params:
                opts.append((torch.optim.SGD(scale_params, lr=p.scale_lr, momentum=p.scale_momentum), p.scale_lr))
            bs = p.batch_size
            steps = ctx.progress(range(p.steps), desc="OSTQuant steps") if ctx.progress else range(p.steps)
            for step in steps:
                picks = order[[(step * bs + j) % len(order) for j in range(bs)]]
                ids = windows[picks]
                with torch.no_grad():
                    teacher = ctx.model(ids, use_cache=False).logits
                loss = kl_top(trainer.logits(r1, r2s, scales, ids), teacher, p.top_k, p.kl_renormalize)
                for opt, base in opts:
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(base, step, p.steps)
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
                   "transform_seconds": round(seconds, 3), "transform_peak_mb": round(mem.peak_bytes / 2**20, 1),
                   "steps": float(p.steps), "scale_max_change": max(spread) if spread else 0.0}
        info = {"seed": ctx.seed, "init": p.init, "steps": p.steps, "losses": losses, "peak_bytes": mem.peak_bytes,
                "peak_kind": mem.kind, "windows": list(windows.shape),
                "orthogonality_error": max(orthogonality_error(r) for r in [r1_final, *r2_final]), "metrics": metrics}
        rot = Rotations(residual=r1_final, qk=self._qk(ctx), down_kind="hadamard", heads=r2_final, info=info)
        tensors = {**rot.to_tensors(), **scales_to_tensors(s_final)}
        meta = {"steps": p.steps, "calib_peak_bytes": mem.peak_bytes, "down_kind": "hadamard", "info": info}
        self.solve_weights(ctx, lambda work, adapter: install_ost(work, adapter, rot, s_final), tensors, meta)
        return State(tensors=tensors, meta=meta)

    def install(self, model, adapter, rot: Rotations, state: State) -> None:
        install_ost(model, adapter, rot, scales_from_tensors(state.tensors, adapter.num_layers))

    def objective(self, ctx: CalibContext, r1, r2s, scales, ids) -> float:
        """The training loss (KL-Top of the quantized model) at the given transforms, without gradients."""
        trainer = self.training_model(ctx)
        with torch.no_grad(), straight_through_quantizers():
            teacher = ctx.model(ids, use_cache=False).logits
            student = trainer.logits(r1, r2s, scales, ids)
        return float(kl_top(student, teacher, self.params.top_k, self.params.kl_renormalize))
