"""GPTQ (Frantar et al., ICLR 2023): Hessian-compensated rounding, shared by every method that uses it.

`gptq_quantize_weight` solves one weight matrix W [out, in] given H = 2/n Σ x xᵀ of its inputs:
columns are quantized left to right (or by decreasing diag H with act-order) and each column's rounding
error is spread over the not yet quantized columns through the upper Cholesky factor U of H⁻¹
(H⁻¹ = UᵀU), in lazy blocks of `block_size` columns (one matmul per block for the columns to its right).

Quantization params, with any format of harness.formats:
  * per-row / per-tensor formats: computed once, up front, from the whole (dead-column-zeroed) rows.
  * group formats (int*_gN, MX blocks of 32, NV blocks of 16, along the input dim): a group's scale (and
    zero point) is computed from the current, already error-compensated weights of its columns when its
    first column is reached, then every column of the group is rounded with those fixed params
    (as the reference GPTQ does). Blocks are widened to a multiple of the group so a group never straddles
    a lazy block and its weights are fully up to date when its params are chosen.
  * static groups (`static_groups=True`, and ALWAYS with act-order + groups): every group's params are
    fixed up front from the original weights of its ORIGINAL contiguous columns; each column, whatever its
    position in the act-order permutation, is rounded with the params of its original group. This keeps
    the format's storage layout (contiguous groups / MX and NV blocks); the reference's other act-order
    variant (params per permuted group, stored through a g_idx) has no such layout, so it is not offered.
  * NVFP4 / NVINT4: the fp32 per-tensor second-level scale comes from the ORIGINAL W's amax
    (`tensor_amax`, computed when not given) and stays fixed; only the E4M3 block scales are searched.
  * `mse_clip`: wherever params are computed, also try shrinking the range by factors 0.99 .. 0.80 (steps
    of 0.01; the reference quantizer's `mse` option goes down to 0.21 with its maxshrink=0.8, grid=100) and
    keep, per row and group, the factor with the least Σ|q - w|^2.4. `mse_shrinks=FPQUANT_SHRINKS` is
    FP-Quant's MSE observer instead (MR-GPTQ: 100 factors down to 0.208).

`gptq_quantize_model` runs the solver decoder layer by decoder layer (see its docstring).
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.calib import Hessian, InputDrift, run_layer, walk_layers
from harness.errors import InvalidValueError, PtqbenchError
from harness.formats import (
    Format,
    QuantParams,
    compute_params,
    get_format,
    quantize,
    quantize_with_params,
)

MSE_SHRINKS = tuple(1 - i / 100 for i in range(21))  # 1.00, 0.99, ..., 0.80
# FP-Quant's MSE observer (MR-GPTQ): 100 factors 1 - i·0.8/100, 1.00 down to 0.208, same |·|^2.4 error
FPQUANT_SHRINKS = tuple(1 - i * 0.8 / 100 for i in range(100))
MSE_NORM = 2.4
DAMP_RETRIES = 3  # a failed Cholesky retries with 10x, 100x, 1000x the dampening (at least 1e-4)


class GPTQError(PtqbenchError):
    """The solver cannot run on this Hessian (not finite, or not positive definite even when damped)."""


@dataclass
class SolveInfo:
    """What one `gptq_quantize_weight` call did.

    error: GPTQ's own loss, ½ Σ_j ||w_j − q_j||² / U_jj² (w_j the compensated column when it was rounded).
    params: the quantization params actually used, indexed by ORIGINAL column group: entry g covers columns
        [g·group_size, (g+1)·group_size); with group_size None there is one entry for all columns.
    perm: the act-order column order (None without act-order). damp: relative dampening actually used.
    """

    error: float
    seconds: float
    damp: float
    group_size: int | None = None
    params: list[QuantParams] = field(default_factory=list, repr=False)
    perm: torch.Tensor | None = field(default=None, repr=False)


def _params(x: torch.Tensor, fmt: Format, tensor_amax, mse_clip: bool,
            shrinks: tuple[float, ...] = MSE_SHRINKS) -> QuantParams:
    """Params of the groups laid out along x's last dim; with mse_clip, the per-group best of `shrinks`."""
    params = compute_params(x, fmt, tensor_amax)
    if not mse_clip:
        return params
    x = x.float()

    def lp_error(values: torch.Tensor, p: QuantParams) -> torch.Tensor:
        return (quantize_with_params(values, p, fmt) - values).abs().pow(MSE_NORM).sum(-1, keepdim=True)

    best = lp_error(x, params)
    last = params
    for shrink in shrinks[1:]:
        trial = compute_params(x, fmt.with_(clip_ratio=fmt.clip_ratio * shrink), tensor_amax)
        # A group whose params did not move since the last shrink has that shrink's error again (already
        # compared): only the moved groups are scored. E8M0 / E4M3 scales move a few times over the whole
        # grid, so FP-Quant's 100-step search costs a few full passes, not 100.
        moved = _moved(trial, last)[..., 0]
        last = trial
        if not bool(moved.any()):
            continue
        if float(moved.float().mean()) > 0.5:  # fp32 scales move at (almost) every shrink: no gather
            err = lp_error(x, trial)
        else:
            err = torch.full_like(best, float("inf"))
            err[moved] = lp_error(x[moved], _rows(trial, moved))
        better = err < best
        best = torch.where(better, err, best)
        params = QuantParams(*(None if old is None else torch.where(better, new, old)
                               for old, new in ((params.scale, trial.scale), (params.zero, trial.zero),
                                                (params.inv_scale, trial.inv_scale))))
    return params


def _moved(a: QuantParams, b: QuantParams) -> torch.Tensor:
    """Per group ([..., 1]): do the params differ (NaN counts as moved)?"""
    moved = a.scale != b.scale
    for x, y in ((a.zero, b.zero), (a.inv_scale, b.inv_scale)):
        if x is not None:
            moved = moved | (x != y)
    return moved


def _rows(p: QuantParams, rows: torch.Tensor) -> QuantParams:
    """The params of the groups selected by the boolean mask `rows` (over the leading dims)."""
    return QuantParams(*(None if t is None else t[rows] for t in (p.scale, p.zero, p.inv_scale)))


def clip_searched_rtn(weight: torch.Tensor, fmt: Format | str, shrinks: tuple[float, ...] = MSE_SHRINKS) -> torch.Tensor:
    """Round-to-nearest with the reference quantizer's clipping search (QuaRot / SpinQuant `--w_clip` for
    RTN weights): every quantization group (the tensor, a row, or a group / block) keeps the range shrink
    1.00 .. 0.80 with the least Σ|q - w|^2.4. Returns the quantized weight (weight's dtype)."""
    fmt = get_format(fmt)
    w = weight.detach().float()
    tensor_amax = w.abs().amax() if fmt.scale_type == "e4m3" else None
    if fmt.granularity == "tensor":
        x = w.reshape(1, -1)
    elif fmt.granularity == "group":
        x = w.reshape(-1, fmt.group_size)
    else:
        x = w.reshape(-1, w.shape[-1])
    q = quantize_with_params(x, _params(x, fmt, tensor_amax, mse_clip=True, shrinks=shrinks), fmt)
    return q.reshape(weight.shape).to(weight.dtype)


def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U with (H + λI)⁻¹ = UᵀU, λ = damp · mean(diag H); retries with more dampening if H is not PD."""
    if not torch.isfinite(h).all():
        raise GPTQError("GPTQ Hessian has non-finite entries (NaN/Inf in the calibration activations)")
    mean_diag = torch.mean(torch.diagonal(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(DAMP_RETRIES + 1):
        try:
            lower = torch.linalg.cholesky(h + damp * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), damp
        except torch.linalg.LinAlgError:
            if attempt == DAMP_RETRIES:
                raise GPTQError(f"GPTQ Hessian is not positive definite even with damp={damp}") from None
            damp = max(damp * 10, 1e-4)
    raise AssertionError("unreachable")


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format | str, block_size: int = 128,
                         damp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                         mse_clip: bool = False, tensor_amax: torch.Tensor | float | None = None,
                         drift: torch.Tensor | None = None, alpha: float = 0.0,
                         mse_shrinks: tuple[float, ...] = MSE_SHRINKS) -> tuple[torch.Tensor, SolveInfo]:
    """Quantize `weight` [out, in] given its input Hessian [in, in]; returns (Q on the format grid, info).

    Q has weight's dtype and device; the solve runs in fp32 on the weight's device.
    `drift` (GPTAQ's asymmetric calibration): D = 2/n Σ (x - x̃) x̃ᵀ between the full-precision inputs x
    and the quantized prefix's inputs x̃ (H is then x̃'s Hessian). The target becomes the FP output W x:
    with P = α · triu₁(D Uᵀ) U (U the upper Cholesky factor of H⁻¹), every column update also adds
    w_i P[i, i:] (w_i the column before rounding; the lazy update adds W_block P[block, right], with the
    block already rounded, as the official code). α = 0 (or no drift) is GPTQ bit for bit.
    """
    start = time.perf_counter()
    fmt = get_format(fmt)
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise InvalidValueError("GPTQ weight/Hessian shapes", (tuple(weight.shape), tuple(hessian.shape)),
                                "W [out, in] with H [in, in]")
    if block_size < 1 or damp < 0:
        raise InvalidValueError("GPTQ block_size/damp", (block_size, damp), "block_size >= 1, damp >= 0")
    device = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    rows, cols = w.shape
    group = fmt.group_size if fmt.granularity == "group" else None
    if group and cols % group:
        raise InvalidValueError(f"input dim for {fmt.name} (group size {group})", cols, f"a multiple of {group}")
    if fmt.scale_type == "e4m3" and tensor_amax is None:
        tensor_amax = w.abs().amax()  # from the original weights, before any update

    # A column no calibration input ever reached: its weight cannot matter, zero it (and keep H invertible).
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if drift is not None and alpha != 0:
        drift = drift.detach().to(device=device, dtype=torch.float32).clone()
        drift[:, dead] = 0.0
    else:
        drift = None

    fixed = None  # per-row / per-tensor: one set of params, fixed up front
    if fmt.granularity == "tensor":
        fixed = _params(w.reshape(1, -1), fmt, tensor_amax, mse_clip, mse_shrinks)  # [1, 1]: broadcasts over rows
    elif group is None:
        fixed = _params(w, fmt, tensor_amax, mse_clip, mse_shrinks)
    n_groups = cols // group if group else 1
    used: list[QuantParams | None] = [fixed] if group is None else [None] * n_groups
    if group and (static_groups or act_order):
        used = [_params(w[:, g * group:(g + 1) * group], fmt, tensor_amax, mse_clip, mse_shrinks)
                for g in range(n_groups)]
    dynamic = group is not None and used[0] is None
    if group and block_size % group:
        block_size = group * max(1, round(block_size / group))  # groups never straddle two lazy blocks

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
        drift = drift[perm][:, perm] if drift is not None else None
    order = perm.tolist() if perm is not None else list(range(cols))
    hinv, damp_used = _upper_cholesky_of_inverse(h, damp)
    del h
    p = alpha * torch.triu(drift @ hinv.T, diagonal=1) @ hinv if drift is not None else None

    q = torch.zeros_like(w)
    loss = torch.zeros(rows, dtype=torch.float64, device=device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = order[b0 + i]  # original index of this column
            if dynamic and col % group == 0:  # first column of a group: params from the updated weights
                used[col // group] = _params(w1[:, i:i + group], fmt, tensor_amax, mse_clip, mse_shrinks)
            params = used[col // group] if group else fixed
            column = w1[:, i]
            qcol = quantize_with_params(column[:, None], params, fmt)[:, 0]
            q[:, b0 + i] = qcol
            e = (column - qcol) / hinv1[i, i]
            loss += e.double() ** 2
            if p is None:
                w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]  # compensate inside the block now
            else:  # (the right-hand side is computed before the in-place update: `column` is still w_i)
                w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :] - column[:, None] * p[b0 + i, b0 + i:b1][None, :]
            err1[:, i] = e
        if p is None:
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:]  # ... and to the right of it, lazily, once per block
        else:
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:] - w1 @ p[b0:b1, b1:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    info = SolveInfo(float(loss.sum() / 2), time.perf_counter() - start, damp_used, group, used, perm)
    return q.to(weight.dtype), info


# ---- layer by layer ------------------------------------------------------------------------------
class GPTQWeights(dict):
    """{model parameter name: quantized weight (CPU)}, plus `.report`: per-layer/per-linear records
    (error, seconds, damp used), run settings, and `.report["rtn_fallback"]`: the experts (or linears)
    that no calibration token reached and that were therefore rounded to nearest instead (also warned
    about). Everything in `.report` is JSON-serialisable."""

    def __init__(self):
        super().__init__()
        self.report: dict = {"layers": [], "linears": [], "rtn_fallback": []}


def _site_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the matmul really sees: the online transform of a QuantLinear applied (activations in FP)."""
    transform = getattr(module, "input_transform", None)
    return transform(x) if transform is not None else x


def _stages(view, true_sequential: bool) -> list[dict]:
    """Linears grouped by the input they share (one Hessian per group), in layer order; with
    true_sequential each stage is calibrated after the previous one is quantized."""
    stages = [{"groups": [[view.q, view.k, view.v]], "experts": ()},
              {"groups": [[view.o]], "experts": ()},
              {"groups": [view.mlp_in] if view.mlp_in else [], "experts": ("gate_up",)},
              {"groups": [[lin] for lin in view.mlp_out], "experts": ("down",)}]
    if view.experts is None:
        for stage in stages:
            stage["experts"] = ()
    if true_sequential:
        return stages
    return [{"groups": [g for s in stages for g in s["groups"]],
             "experts": tuple(e for s in stages for e in s["experts"])}]


def _hessian_hooks(view, groups: list[list[nn.Linear]], handles: list,
                   paired: _FullPrecisionStream | None = None) -> dict[int, Hessian]:
    """One Hessian per set of linears with the same input (and the same online transform, if any).
    With `paired` (GPTAQ), the Hessian is of what the matmul sees (activation quantizers included) and
    each set also gets an `InputDrift` against the full-precision stream's input of the same site."""
    by_linear: dict[int, Hessian] = {}
    for group in groups:
        shared: dict[int, Hessian] = {}  # id(input transform) -> Hessian
        for lin in group:
            site = view.site_of(lin)
            key = id(getattr(site, "input_transform", None))
            if key not in shared:
                shared[key] = hess = Hessian(lin.in_features)
                if paired is None:
                    handles.append(site.register_forward_hook(
                        lambda mod, args, _out, hess=hess: hess.add(_site_input(mod, args[0]))))
                else:
                    handles.append(paired.pair(view, site, hess))
            by_linear[id(lin)] = shared[key]
            if paired is not None:
                paired.drift[id(lin)] = paired.drift[id(shared[key])]
    return by_linear


def _matmul_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the matmul really sees, activation quantization included (QuantLinear.quantize_input)."""
    quantize_input = getattr(module, "quantize_input", None)
    return quantize_input(x) if quantize_input is not None else x


class _FullPrecisionStream:
    """GPTAQ's second stream: the full-precision model's hidden states (per batch) and, for the current
    layer, a full-precision copy of it (quantizers off) whose linear inputs are paired, batch by batch,
    with the quantized layer's. Only one batch of paired inputs is held at a time (no per-token cache)."""

    def __init__(self, hidden: list[torch.Tensor]):
        self.hidden = list(hidden)
        self.layer: nn.Module | None = None
        self.outputs: list[torch.Tensor] | None = None
        self.inputs: dict[str, torch.Tensor] = {}  # site name in the layer -> its FP input, current batch
        self.drift: dict[int, InputDrift] = {}  # id(Hessian) and id(linear) -> the drift of that input

    def enter(self, view) -> None:
        from harness.quant.quantizer import quantizers

        self.layer = copy.deepcopy(view.module)
        for quantizer in quantizers(self.layer):
            quantizer.fmt = None
        self.outputs = None

    def pair(self, view, site: nn.Module, hess: Hessian):
        """Hooks the FP copy's `site` (keeps its input) and the live one (Hessian and drift); one handle."""
        name = next(n for n, m in view.module.named_modules() if m is site)
        twin = self.layer.get_submodule(name)
        drift = self.drift[id(hess)] = InputDrift(hess.dim)

        def keep(mod, args, _out):
            self.inputs[name] = _matmul_input(mod, args[0])

        def add(mod, args, _out):
            x_q = _matmul_input(mod, args[0])
            hess.add(x_q)
            drift.add(self.inputs.pop(name), x_q)

        return _Handles(twin.register_forward_hook(keep), site.register_forward_hook(add))

    def forward(self, step) -> None:
        """Each batch through the FP copy, then through the live layer (hooks pair their inputs)."""
        outputs = []
        for fp_x, x, kw in zip(self.hidden, step.hidden, step.kwargs):
            outputs.append(run_layer(self.layer, [fp_x], [kw])[0])
            run_layer(step.view.module, [x], [kw])
        self.outputs = self.outputs or outputs  # the FP copy never changes within a layer

    def exit(self) -> None:
        self.hidden, self.layer, self.outputs = self.outputs, None, None
        self.drift.clear()


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _expert_hooks(view, parts: tuple[str, ...], handles: list) -> dict[str, list[Hessian]]:
    """Per-expert Hessians of the fused experts, from the tokens the router sends to each expert."""
    if not parts:
        return {}
    experts = view.experts
    n = experts.num_experts
    hess = {part: [Hessian(getattr(experts, part).shape[-1]) for _ in range(n)] for part in parts}

    def hook(mod, args, kwargs, _out):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        for e in range(n):
            token = torch.where((index == e).any(-1))[0]
            if token.numel() == 0:
                continue
            x = hidden[token]
            if "gate_up" in hess:
                hess["gate_up"][e].add(x)
            if "down" in hess:  # the down input as the expert computes it, with the current gate_up
                gate, up = nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                transform = getattr(mod, "down_transform", None)
                hess["down"][e].add(transform(h) if transform is not None else h)

    handles.append(experts.module.register_forward_hook(hook, with_kwargs=True))
    return hess


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, adapter, calib_inputs: torch.Tensor, weight_fmt: Format | str,
                        block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                        static_groups: bool = False, mse_clip: bool = False, true_sequential: bool = False,
                        batch_size: int = 8, progress: Callable | None = None,
                        alpha: float | None = None) -> GPTQWeights:
    """Quantize every decoder-layer weight in place with GPTQ; returns {parameter name: quantized weight}.

    The inputs of decoder layer 0 are captured once (the model stops there); then, layer by layer: run the
    layer on the calibration batches with hooks that accumulate one Hessian per set of linears sharing an
    input (q/k/v, o, gate/up, down; fused MoE experts: one per expert from the tokens routed to it), solve
    and write each weight, and recompute the layer's outputs with the quantized weights as the next layer's
    inputs. With `true_sequential`, the stages q/k/v -> o -> gate/up(+experts) -> down(+experts) are
    calibrated one after another inside a layer, each seeing the quantized stages before it.
    Experts that no calibration token reached are rounded to nearest (RTN), warned about and listed in
    `result.report["rtn_fallback"]`. Router, norms, embeddings and lm_head are left untouched.

    `alpha` (not None) switches to GPTAQ's asymmetric calibration: a second, full-precision stream runs
    beside the quantized one (a full-precision copy of each layer, its quantizers off); each linear's
    Hessian is of the quantized stream's input as the matmul sees it (with any activation quantizers the
    model carries), its `InputDrift` pairs that with the FP stream's input, and the solver targets the FP
    output (`gptq_quantize_weight(drift=..., alpha=alpha)`). Fused experts are solved with plain GPTQ
    (routing differs between the streams, so their tokens do not pair).
    """
    if adapter is None:
        from harness.models import get_adapter

        adapter = get_adapter(model)
    if progress is None:
        from harness.progress import track as progress
    fmt = get_format(weight_fmt)
    solve = dict(block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups,
                 mse_clip=mse_clip)
    names = {id(p): n for n, p in model.named_parameters()}
    result = GPTQWeights()
    result.report["settings"] = {**solve, "true_sequential": true_sequential, "format": fmt.name,
                                 "n_windows": int(calib_inputs.shape[0]), "seqlen": int(calib_inputs.shape[-1]),
                                 **({"gptaq_alpha": alpha} if alpha is not None else {})}
    paired: _FullPrecisionStream | None = None
    for step in walk_layers(model, adapter, calib_inputs, batch_size, progress=progress, desc="GPTQ layers"):
        view = step.view
        start = time.perf_counter()
        forward_s = 0.0
        if alpha is not None:
            paired = paired or _FullPrecisionStream(step.hidden)  # layer 0: both streams start from the embeddings
            paired.enter(view)
        for stage in _stages(view, true_sequential):
            handles: list = []
            try:
                hess = _hessian_hooks(view, stage["groups"], handles, paired)
                expert_hess = _expert_hooks(view, stage["experts"], handles)
                t = time.perf_counter()
                step.forward() if paired is None else paired.forward(step)
                forward_s += time.perf_counter() - t
            finally:
                for handle in handles:
                    handle.remove()
            linears = {id(lin): (short, lin) for short, lin in view.linears().items()}
            for group in stage["groups"]:
                for lin in group:
                    short, name = linears[id(lin)][0], names[id(lin.weight)]
                    if hess[id(lin)].n == 0:  # the calibration never reached it: RTN, loudly
                        lin.weight.copy_(quantize(lin.weight, fmt))
                        warnings.warn(f"GPTQ: layer {view.index} {short} got no calibration input; RTN instead",
                                      stacklevel=2)
                        result.report["rtn_fallback"].append({"layer": view.index, "param": name})
                    else:
                        asym = {} if paired is None else {"drift": paired.drift[id(lin)].d, "alpha": alpha}
                        q, info = gptq_quantize_weight(lin.weight, hess[id(lin)].h, fmt, **solve, **asym)
                        lin.weight.copy_(q)
                        result.report["linears"].append(_record(view.index, short, name, lin.weight.shape, info))
                    result[name] = lin.weight.detach().cpu().clone()
            for part, per_expert in expert_hess.items():
                _solve_experts(view, part, per_expert, fmt, solve, names, result)
        t = time.perf_counter()
        step.run()  # inputs of the next layer, through the quantized weights
        forward_s += time.perf_counter() - t
        if paired is not None:
            paired.exit()
        result.report["layers"].append({"layer": view.index, "seconds": time.perf_counter() - start,
                                        "forward_seconds": forward_s})
    return result


def _record(layer: int, short: str, name: str, shape, info: SolveInfo) -> dict:
    return {"layer": layer, "linear": short, "param": name, "shape": list(shape), "error": info.error,
            "seconds": info.seconds, "damp": info.damp}


def _solve_experts(view, part: str, per_expert: list[Hessian], fmt: Format, solve: dict, names: dict,
                   result: GPTQWeights) -> None:
    param = getattr(view.experts, part)
    name = names[id(param)]
    start, error = time.perf_counter(), 0.0
    # Same conventions as RTN of the fused tensor (harness.quant.apply): an NV tensor scale from the amax of
    # all experts together, and RTN of the fused tensor for experts no calibration token reached.
    amax = param.abs().amax() if fmt.scale_type == "e4m3" else None
    rtn = [e for e, hess in enumerate(per_expert) if hess.n == 0]
    rtn_weights = quantize(param.data, fmt) if rtn else None
    for e, hess in enumerate(per_expert):
        if hess.n == 0:  # never left in full precision
            param[e].copy_(rtn_weights[e])
        else:
            q, info = gptq_quantize_weight(param[e], hess.h, fmt, tensor_amax=amax, **solve)
            param[e].copy_(q)
            error += info.error
    if rtn:
        warnings.warn(f"GPTQ: layer {view.index} {part} experts {rtn} got no calibration tokens; "
                      f"quantized with RTN instead", stacklevel=3)
        result.report["rtn_fallback"].append({"layer": view.index, "param": name, "experts": rtn})
    result[name] = param.detach().cpu().clone()
    result.report["linears"].append({"layer": view.index, "linear": f"experts.{part}", "param": name,
                                     "shape": list(param.shape), "error": error,
                                     "seconds": time.perf_counter() - start, "experts_rtn": rtn})


def gptq_after_transform(model: nn.Module, install: Callable, calib_inputs: torch.Tensor, weight_fmt: Format | str,
                         block_size: int = 128, damp: float = 0.01, progress: Callable | None = None,
                         mse_clip: bool = False, true_sequential: bool = False,
                         alpha: float | None = None) -> GPTQWeights:
    """GPTQ weights of `model` transformed by `install(copy, adapter)`, solved on a copy (the model is left
    as it is): what transform methods (QuaRot, SpinQuant, OSTQuant, FlatQuant) store as their weights.
    `alpha`: GPTAQ's asymmetric calibration instead (see `gptq_quantize_model`)."""
    from harness.models import get_adapter

    work = copy.deepcopy(model)
    adapter = get_adapter(work)
    install(work, adapter)
    return gptq_quantize_model(work, adapter, calib_inputs, weight_fmt, block_size=block_size, damp=damp,
                               progress=progress, mse_clip=mse_clip, true_sequential=true_sequential, alpha=alpha)
