"""WUSH: near-optimal adaptive transforms for LLM quantization (Chen, Egiazarian, Castro, Hoefler, Alistarh —
ISTA / Red Hat AI / ETH, arXiv 2512.00956). Official code: IST-DASLab/WUSH (`src/quantization/wush_gptq.py`).

A closed-form, data-aware, *non-orthogonal* blockwise transform per linear, for weights and activations
quantized to the same block format with absmax scales. Per linear W [R, C] reading inputs X:

    H = XᵀX / n + 1% mean(diag) I;   U upper Cholesky (UᵀU = H)
    for each block b of B input channels (B = the format's block: 32 MX, 16 NV):
        Y_b = U_bb W_bᵀ                         (the block's whitened weights, B x R)
        Y_b = V S Ũᵀ (SVD);  s = S / sqrt(R) + 1% mean
        T_b = H_B diag(s^½) Vᵀ U_bb^{-ᵀ}        (H_B the normalised Hadamard: the "W·U·S·H" of the name)

Activations are transformed online, x_b -> x_b T_bᵀ, then quantized; the weights are stored in the
transformed coordinates, W_b T_b^{-1}, then quantized (RTN, or GPTQ on the transformed inputs). With every
quantizer off the layer computes the same function. `transform`: "wush" (above), "wus" (identity instead
of H_B, the official ablation), "hadamard" (T_b = H_B: the data-free block-Hadamard baseline), "identity".
Calibration walks the decoder layers in order on a copy, each layer's inputs coming from the prefix with
its transformed weights quantized (the GPTQ convention of this harness; activations of the prefix in full
precision). `metrics`: the mean over linears of the relative W+A output error on calibration rows for the
identity, block-Hadamard and chosen transforms (the paper's per-layer check).

Deviations and their likely effect:
- The official GPTQ path recomputes T_b from the error-updated weights during its Babai sweep (last block
  first); here T_b comes from the unquantized weights and GPTQ then runs in the transformed coordinates with
  H_t = T H Tᵀ: the same transform as the RTN path; a small effect expected.
- Formats are the harness's (OCP MX scales, NVFP4 with a per-tensor global scale from the tensor's amax); the
  official code quantizes weights with its own constants (MXFP4: scale = amax·3/4 in E8M0; NVFP4: a fixed
  global scale 10 instead of an amax-derived one).
- All of a layer's Hessians come from one forward pass (not q/k/v -> o -> gate/up -> down in turn).
- Fused MoE experts get no transform (RTN as the scheme says); `weight_solver: gptq` refuses MoE models.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import NonNegativeFloat, PositiveInt

from harness.calib import Hessian, RowSample, walk_layers
from harness.errors import UnsupportedModelError
from harness.formats import get_format, quantize
from harness.method import CalibContext, Method, MethodParams
from harness.registry import register_method
from harness.state import State
from harness.transforms import apply_block_rotation, hadamard


# ---- the transform (one linear) ----------------------------------------------------------------------
def damped_upper_cholesky(h: torch.Tensor, damp: float = 0.01, tries: int = 100) -> torch.Tensor:
    """U with UᵀU = H + damp·mean(diag H)·I, the damping added again until the factorisation succeeds."""
    h = h.double().clone()
    step = damp * torch.diagonal(h).mean().clamp_min(1e-12)
    for _ in range(tries):
        h.diagonal().add_(step)
        u, info = torch.linalg.cholesky_ex(h, upper=True)
        if int(info) == 0:
            return u
    raise UnsupportedModelError("wush", "Hessian", f"not positive definite after {tries} dampings")


def diagonal_blocks(m: torch.Tensor, block: int) -> torch.Tensor:
    """[C/B, B, B]: the diagonal B x B blocks of a [C, C] matrix."""
    n = m.shape[0] // block
    idx = torch.arange(n)
    return m.reshape(n, block, n, block)[idx, :, idx, :]


def wush_transforms(weight: torch.Tensor, hessian: torch.Tensor, block: int,
                    kind: Literal["wush", "wus", "hadamard", "identity"] = "wush", damp: float = 0.01) -> torch.Tensor:
    """T [C/B, B, B] (float64) of one linear, weight [R, C], hessian [C, C] (see the module docstring)."""
    rows, cols = weight.shape
    n = cols // block
    eye = torch.eye(block, dtype=torch.float64)
    if kind in ("identity", "hadamard"):
        return (eye if kind == "identity" else hadamard(block)).expand(n, block, block).clone()
    backbone = hadamard(block) if kind == "wush" else eye
    u_bb = diagonal_blocks(damped_upper_cholesky(hessian, damp), block)  # [n, B, B], upper triangular
    y = u_bb @ weight.double().T.reshape(n, block, rows)  # [n, B, R]: whitened weights
    v, s, _ = torch.linalg.svd(y, full_matrices=True)  # V [n, B, B]; min(B, R) singular values
    s = s / rows ** 0.5
    s = torch.nn.functional.pad(s, (0, block - s.shape[-1])) + 0.01 * s.mean(-1, keepdim=True)  # R < B: zeros, damped
    m = (backbone * s[:, None, :].sqrt()) @ v.transpose(-2, -1)  # H_B diag(s^½) Vᵀ
    return torch.linalg.solve_triangular(u_bb.transpose(-2, -1), m, upper=False, left=False)  # · U_bb^{-ᵀ}


def transform_inputs(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x -> x_b T_bᵀ on every block b of the last dim (in x's dtype)."""
    return apply_block_rotation(x, t.transpose(-2, -1))


def transform_weight(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """W [R, C] -> W_b T_b^{-1} per block (float64), so that (x Tᵀ)(W T^{-1})ᵀ = x Wᵀ."""
    rows, cols = weight.shape
    n, block = t.shape[0], t.shape[1]
    w = weight.double().reshape(rows, n, block).transpose(0, 1)  # [n, R, B]
    return torch.linalg.solve(t.double(), w, left=False).transpose(0, 1).reshape(rows, cols)


def transformed_hessian(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[(xTᵀ)ᵀ(xTᵀ)] = T_bd H T_bdᵀ for the block-diagonal T_bd."""
    n, block = t.shape[0], t.shape[1]
    blocks = h.double().reshape(n, block, n, block)
    return torch.einsum("iab,ibjc,jdc->iajd", t.double(), blocks, t.double()).reshape(h.shape)


def output_error(x: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, weight_fmt, act_fmt) -> float:
    """||Q(x Tᵀ) Q(W T^{-1})ᵀ - x Wᵀ||² / ||x Wᵀ||² on rows x (either format may be None: not quantized)."""
    xt = transform_inputs(x.double(), t).float()
    wt = transform_weight(weight, t).float()
    if act_fmt is not None:
        xt = quantize(xt, act_fmt)
    if weight_fmt is not None:
        wt = quantize(wt, weight_fmt)
    ref = x.float() @ weight.float().T
    return float((xt @ wt.T - ref).double().pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30))


# ---- the method ----------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class WushSite:
    transform: torch.Tensor  # [C/B, B, B], float64
    weight: torch.Tensor | None = None  # GPTQ weight in the transformed coordinates (else RTN at apply)


@dataclass(kw_only=True)
class WushState(State):
    layers: list[dict[str, WushSite]] = field(default_factory=list)  # per decoder layer: role -> site


def format_block(scheme) -> int:
    """The block the transform works in: the activation format's group (else the weight's), else 32."""
    for fmt in (getattr(scheme, "activation", None), getattr(scheme, "weight", None)):
        if fmt is not None and fmt.granularity == "group":
            return fmt.group_size
    return 32


@register_method("wush")
class WUSH(Method):
    """Per-linear data-aware blockwise transforms (Hadamard x whitened-weight second moment), then RTN or GPTQ."""

    version = 1
    state_type = WushState
    conformance_params = {"weight_solver": "rtn"}
    uses_seed = False  # closed form from the calibration Hessians

    class Params(MethodParams):
        transform: Literal["wush", "wus", "hadamard", "identity"] = "wush"
        weight_solver: Literal["rtn", "gptq"] = "rtn"
        block: PositiveInt | None = None  # default: the scheme's format block (32 MX, 16 NV)
        damp: NonNegativeFloat = 0.01
        gptq_block_size: PositiveInt = 128
        act_order: bool = False  # GPTQ columns by decreasing Hessian diagonal (groups stay static)
        static_groups: bool = False  # GPTQ group scales fixed up front from the transformed weight
        observer: Literal["minmax", "mse"] = "minmax"  # mse: FP-Quant's 100-step scale search (RTN and GPTQ)
        error_rows: PositiveInt = 256  # calibration rows per linear for the output-error metrics
        batch_size: PositiveInt = 4

    def calib_scheme_key(self, scheme):
        # the transforms depend on the prefix's quantized weights, the block and the formats of the metrics
        return {k: (f.to_dict() if f is not None else None)
                for k, f in (("weight", scheme.weight), ("activation", scheme.activation))}

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> WushState:
        p = self.params
        block = p.block or format_block(ctx.scheme)
        weight_fmt, act_fmt = ctx.scheme.weight, ctx.scheme.activation
        if p.weight_solver == "gptq" and ctx.adapter.is_moe:
            raise UnsupportedModelError("wush weight_solver=gptq", ctx.adapter.family, "dense models (experts are not solved)")
        from harness.models import get_adapter

        work = copy.deepcopy(ctx.model)  # the cell's model stays as it is
        adapter = get_adapter(work)
        layers: list[dict[str, WushSite]] = []
        errors = {"identity": [], "hadamard": [], p.transform: []}
        for step in walk_layers(work, adapter, ctx.calib_inputs(), p.batch_size, progress=ctx.progress,
                                desc="WUSH layers"):
            linears = step.view.linears()
            stats, handles = {}, []
            for role, lin in linears.items():  # one Hessian per linear (q/k/v read the same input: cheap at smoke)
                stats[role] = (Hessian(lin.in_features), RowSample(p.error_rows, ctx.seed))
                handles.append(lin.register_forward_hook(lambda _m, args, _o, s=stats[role]: _observe(s, args[0])))
            try:
                step.forward()
            finally:
                for h in handles:
                    h.remove()
            sites = {}
            for role, lin in linears.items():
                hess, rows = stats[role]
                second_moment = hess.h / 2  # the harness Hessian is GPTQ's 2/n Σ xxᵀ; WUSH's H is XᵀX / n
                t = wush_transforms(lin.weight, second_moment, block, p.transform, p.damp)
                sample = rows.sample()
                for name in errors:
                    tt = t if name == p.transform else wush_transforms(lin.weight, second_moment, block, name, p.damp)
                    errors[name].append(output_error(sample, lin.weight, tt, weight_fmt, act_fmt))
                w_t = transform_weight(lin.weight, t)
                solved = None
                if p.weight_solver == "gptq" and weight_fmt is not None:
                    from harness.gptq import gptq_quantize_weight

                    solved, _ = gptq_quantize_weight(w_t.float(), transformed_hessian(hess.h, t), weight_fmt,
                                                     block_size=p.gptq_block_size, damp=p.damp,
                                                     act_order=p.act_order, static_groups=p.static_groups,
                                                     **self._observer())
                    solved = solved.float()
                sites[role] = WushSite(transform=t, weight=solved)
                # the prefix the next layers see: the transform in place, its weights quantized
                _install_site(step.view, role, t, solved if solved is not None else w_t.float(),
                              weight_fmt if solved is None else None, self.weight_rounding())
            layers.append(sites)
            step.run()
        metrics = {f"output_error_{name}": sum(v) / len(v) for name, v in errors.items() if v}
        meta = {"block": block, "transform": p.transform, "metrics": metrics}
        return WushState(layers=layers, meta=meta)

    @torch.no_grad()
    def apply(self, model, adapter, state: WushState, scheme):
        from harness.quant import apply_scheme

        solved = any(site.weight is not None for sites in state.layers for site in sites.values())
        for view, sites in zip(adapter.layers(), state.layers):
            for role, site in sites.items():
                weight = site.weight if site.weight is not None else transform_weight(view.site(role).weight, site.transform)
                _install_site(view, role, site.transform, weight, None)
        self._metrics = dict(state.meta.get("metrics", {}))
        apply_scheme(model, adapter, scheme, quantize_weights=not solved, weight_rounding=self.weight_rounding())
        return model

    def _observer(self) -> dict:
        """GPTQ's scale search: none (minmax) or FP-Quant's MSE observer."""
        if self.params.observer == "minmax":
            return {}
        from harness.gptq import FPQUANT_SHRINKS

        return {"mse_clip": True, "mse_shrinks": FPQUANT_SHRINKS}

    def weight_rounding(self):
        """RTN weights: plain, or with FP-Quant's MSE observer."""
        if self.params.observer == "minmax":
            return None
        from harness.gptq import FPQUANT_SHRINKS, clip_searched_rtn

        return functools.partial(clip_searched_rtn, shrinks=FPQUANT_SHRINKS)

    def metrics(self, model, ctx) -> dict[str, float]:
        return dict(getattr(self, "_metrics", {}))


def _observe(stats: tuple[Hessian, RowSample], x: torch.Tensor) -> None:
    for accumulator in stats:
        accumulator.add(x)


def _install_site(view, role: str, t: torch.Tensor, weight: torch.Tensor, weight_fmt, rounding=None) -> None:
    """The linear of `role` reads x Tᵀ (online) with `weight` (rounded to `weight_fmt` unless None)."""
    from harness.quant import wrap_site
    from harness.rotation.fuse import OnlineTransform

    site = wrap_site(view, role)
    w = weight.to(site.linear.weight)
    if weight_fmt is not None:
        w = (rounding or quantize)(w, get_format(weight_fmt))
    site.linear.weight.copy_(w)
    t32 = t.to(torch.float32)
    site.input_transform = OnlineTransform(apply_fn=lambda x, t=t32: transform_inputs(x, t), name="WUSH")
