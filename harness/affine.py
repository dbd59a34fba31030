"""Learned affine transforms (FlatQuant-style): Kronecker-factored invertible matrices, their online
application to activations, weight folding, and fake quantization with learnable clipping ratios.

Conventions as in harness.rotation.fuse: activations are row vectors, a linear computes y = x Wᵀ + b.
An invertible transform T applied online to a linear's input, x -> x T, keeps the output when the
weight becomes W T⁻ᵀ (y = (x T)(W T⁻ᵀ)ᵀ = x Wᵀ). A site's transform here is T = diag(d) (P1 ⊗ P2):

* P1 ⊗ P2 acting on x of size n1·n2 is P1ᵀ X P2 on x viewed as [n1, n2] (two small matmuls, never the
  dense n x n matrix); its inverse-transpose is P1⁻ᵀ ⊗ P2⁻ᵀ.
* Each factor is parameterised "SVD-style", P = U diag(σ) Vᵀ with U, V orthogonal, so that P⁻ᵀ =
  U diag(1/σ) Vᵀ is exact and cheap (FlatQuant does the same). Our choices: U = U0 · exp(K − Kᵀ) and
  V = V0 · exp(M − Mᵀ) (matrix exponential of a skew-symmetric latent: orthogonal for any K, M, and
  U = U0 at K = 0), σ = exp(ℓ) (always > 0, so P never becomes singular). FlatQuant uses torch's
  orthogonal parametrisation and a raw σ; both give the same family of matrices.
* The diagonal d (per-channel scaling, SmoothQuant-style) is folded offline into whatever produces the
  activation (an RMSNorm scale, the rows of up_proj), so online only P1 ⊗ P2 remains.

Learnable clipping: `clipped_fake_quant(x, fmt, ratio)` fake-quantizes exactly as
`quantize(x, fmt with clip_ratio = ratio)` (the group's amax, or min and max, times the ratio sets the
scale), with a per-row ratio allowed. Gradients (OmniQuant / FlatQuant style): straight-through for x
inside the clipped range, plus the LSQ scale gradient (rounding error inside the range, the grid end
outside) reaching both the ratio and the group's extreme elements through scale ∝ ratio · range.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.errors import InvalidValueError, UnknownNameError
from harness.formats import Format, compute_params, get_format, quantize_with_params
from harness.formats.spec import FLOAT_ELEMENTS


# ---- sizes and Kronecker products --------------------------------------------------------------


def balanced_factors(n: int) -> tuple[int, int]:
    """(n1, n2) with n1 · n2 = n, n1 <= n2 and n1 as large as possible (576 -> 24 x 24, 1536 -> 32 x 48)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidValueError("Kronecker transform size", n, "a positive integer")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def kron_act(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """x (A ⊗ B) along the last dim, as Aᵀ X B on x viewed as [..., n1, n2]; None is the identity."""
    n1 = a.shape[0] if a is not None else x.shape[-1] // b.shape[0]
    n2 = x.shape[-1] // n1
    y = x.reshape(*x.shape[:-1], n1, n2)
    if a is not None:
        y = torch.matmul(a.transpose(0, 1).to(y.dtype), y)
    if b is not None:
        y = torch.matmul(y, b.to(y.dtype))
    return y.reshape(x.shape)


# ---- the learnable factor ------------------------------------------------------------------------


class AffineFactor(nn.Module):
    """One invertible factor P = U diag(exp(ℓ)) Vᵀ, U = U0 exp(K − Kᵀ), V = V0 exp(M − Mᵀ).

    Starts at P = U0 V0ᵀ (K = M = 0, ℓ = 0): pass U0 = an orthogonal init (Hadamard, random) and V0 = I,
    or U0 = V0 = I for the identity.
    """

    def __init__(self, u0: torch.Tensor, v0: torch.Tensor | None = None):
        super().__init__()
        n = u0.shape[0]
        self.n = n
        self.register_buffer("u0", u0.detach().to(torch.float32).clone())
        self.register_buffer("v0", (torch.eye(n) if v0 is None else v0).detach().to(torch.float32).clone())
        self.k = nn.Parameter(torch.zeros(n, n))
        self.m = nn.Parameter(torch.zeros(n, n))
        self.log_sigma = nn.Parameter(torch.zeros(n))

    def _parts(self, dtype: torch.dtype):
        k, m = self.k.to(dtype), self.m.to(dtype)
        u = self.u0.to(dtype) @ torch.linalg.matrix_exp(k - k.T)
        v = self.v0.to(dtype) @ torch.linalg.matrix_exp(m - m.T)
        return u, self.log_sigma.to(dtype), v

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u, ls, v = self._parts(dtype)
        return (u * torch.exp(ls)) @ v.T

    def inverse_t(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """P⁻ᵀ = U diag(1/σ) Vᵀ."""
        u, ls, v = self._parts(dtype)
        return (u * torch.exp(-ls)) @ v.T


class KroneckerAffine(nn.Module):
    """A trainable site transform T = diag(d) (P1 ⊗ P2) (a factor may be absent = identity).

    `online` says which factors act on the activation at run time; the others are applied upstream
    (FlatQuant's o_proj site: the head_dim factor is fused into v_proj's output, only the heads factor
    mixes online). `diag_online=False`: d is produced upstream too (folded into up_proj's rows at the
    down sites), so `act` leaves it out. `act` is the online part, `weight` maps a reader's W to W T⁻ᵀ.
    """

    def __init__(self, f1: AffineFactor | None, f2: AffineFactor | None, diag: torch.Tensor | None = None,
                 online: tuple[bool, bool] = (True, True), diag_online: bool = True):
        super().__init__()
        self.f1, self.f2, self.online, self.diag_online = f1, f2, online, diag_online
        self.diag = None if diag is None else nn.Parameter(diag.detach().to(torch.float32).clone())

    def factors(self, dtype=torch.float32):
        return [None if f is None else f.matrix(dtype) for f in (self.f1, self.f2)]

    def inverse_factors(self, dtype=torch.float32):
        return [None if f is None else f.inverse_t(dtype) for f in (self.f1, self.f2)]

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.diag is not None and self.diag_online:
            x = x * self.diag.to(x.dtype)
        a, b = self.factors(x.dtype)
        return kron_act(x, a if self.online[0] else None, b if self.online[1] else None)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W T⁻ᵀ = (W diag(1/d)) (P1⁻ᵀ ⊗ P2⁻ᵀ) along the input (last) dim; batched over leading dims."""
        if self.diag is not None:
            w = w / self.diag.to(w.dtype)
        a, b = self.inverse_factors(w.dtype)
        return kron_act(w, a, b)

    def export(self) -> SiteTransform:
        with torch.no_grad():
            p1, p2 = self.factors(torch.float64)
            return SiteTransform(p1, p2, None if self.diag is None else self.diag.detach().to(torch.float64).clone())


# ---- what a calibration produces, and its installation -----------------------------------------------


@dataclass
class SiteTransform:
    """A site's learned transform, dense float64 factors (None = identity) and the diagonal (None = 1)."""

    p1: torch.Tensor | None = None
    p2: torch.Tensor | None = None
    diag: torch.Tensor | None = None

    def inverse_t(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return tuple(None if p is None else torch.linalg.inv(p.to(torch.float64)).T for p in (self.p1, self.p2))


SITES = ("qkv", "o", "mlp", "down", "experts_down")


@dataclass
class AffineTransforms:
    """Per decoder layer, {site: SiteTransform}. Sites: "qkv" (input of q/k/v, d folded into the attention
    norm), "o" (input of o_proj: p1 over heads online, p2 over head_dim fused into v_proj's output),
    "mlp" (input of gate/up, the shared expert's gate/up and the routed experts' gate_up; d folded into
    the MLP norm, routers compensated), "down" (input of down_proj or the shared expert's down; d folded
    into up_proj's rows), "experts_down" (one transform for every routed expert's down input; d folded
    into each expert's up rows). A missing site is left alone."""

    layers: list[dict[str, SiteTransform]] = field(default_factory=list)



class OnlineKronecker(nn.Module):
    """Inference-time x -> x (P1 ⊗ P2) (fp32 arithmetic), for a QuantLinear / QuantExperts input transform.

    Readers of the same tensor (q, k, v; gate, up) share one instance: the last result is reused when the
    same input object comes again (inference only, keyed on the tensor object and its version).
    """

    def __init__(self, p1: torch.Tensor | None, p2: torch.Tensor | None, name: str = "affine"):
        super().__init__()
        self.name = name
        self.register_buffer("p1", None if p1 is None else p1.to(torch.float32), persistent=False)
        self.register_buffer("p2", None if p2 is None else p2.to(torch.float32), persistent=False)
        self._last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cacheable = not torch.is_grad_enabled()
        if cacheable and self._last is not None:
            ref, version, out = self._last
            if ref() is x and version == (-1 if x.is_inference() else x._version):
                return out
        y = kron_act(x.to(torch.float32), self.p1, self.p2).to(x.dtype)
        if cacheable:
            self._last = (weakref.ref(x), -1 if x.is_inference() else x._version, y)
        return y

    def extra_repr(self) -> str:
        dims = [None if p is None else p.shape[0] for p in (self.p1, self.p2)]
        return f"{self.name}, factors={dims}"


# ---- folding (float64, in place) -------------------------------------------------------------------


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


@torch.no_grad()
def transform_weight_input(weight: torch.Tensor, t: SiteTransform, inv: tuple | None = None) -> None:
    """In place W <- W diag(1/d) (P1⁻ᵀ ⊗ P2⁻ᵀ) along the input dim ([out, in] or fused [E, out, in])."""
    a, b = inv if inv is not None else t.inverse_t()
    w = _f64(weight)
    if t.diag is not None:
        w = w / _f64(t.diag).to(w.device)
    w = kron_act(w, None if a is None else a.to(w.device), None if b is None else b.to(w.device))
    weight.copy_(w.to(weight.dtype))


@torch.no_grad()
def scale_vector(v: torch.Tensor, s: torch.Tensor) -> None:
    """In place v <- v ⊙ s (a norm's scale)."""
    v.copy_((_f64(v) * _f64(s).to(v.device)).to(v.dtype))


@torch.no_grad()
def scale_input_columns(weight: torch.Tensor, s: torch.Tensor) -> None:
    """In place W <- W diag(s) (input dim)."""
    weight.copy_((_f64(weight) * _f64(s).to(weight.device)).to(weight.dtype))


@torch.no_grad()
def scale_output_rows(weight: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """In place W <- diag(s) W (output dim, dim -2), b <- b ⊙ s: the output is multiplied by s."""
    s64 = _f64(s).to(weight.device)
    weight.copy_((_f64(weight) * s64.unsqueeze(-1)).to(weight.dtype))
    if bias is not None:
        bias.copy_((_f64(bias) * s64).to(bias.dtype))


@torch.no_grad()
def transform_head_values(weight: torch.Tensor, p: torch.Tensor, head_dim: int, bias: torch.Tensor | None = None) -> None:
    """v_proj output per head: v_h <- v_h P, i.e. the rows of head h become Pᵀ W_h (and b_h <- b_h P)."""
    out, d_in = weight.shape
    p64 = _f64(p).to(weight.device)
    w = _f64(weight).reshape(out // head_dim, head_dim, d_in)
    weight.copy_(torch.einsum("ji,hjk->hik", p64, w).reshape(out, d_in).to(weight.dtype))
    if bias is not None:
        bias.copy_((_f64(bias).reshape(-1, head_dim) @ p64).reshape(-1).to(bias.dtype))


#: per site, the roles of the linears reading its input (those a layer has); the fused experts read
#: the "mlp" site too (and "experts_down" inside the experts module)
SITE_ROLES = {"qkv": ("q", "k", "v"), "o": ("o",), "mlp": ("gate", "up", "shared_gate", "shared_up"),
              "down": ("down", "shared_down")}


def site_linears(view) -> dict[str, list]:
    """Per site, the live modules (QuantLinear wrappers once wrapped) of the linears reading its input."""
    roles = view.roles()
    return {site: [view.site(r) for r in rs if r in roles] for site, rs in SITE_ROLES.items()}


def weight_roles(view) -> dict[str, torch.Tensor]:
    """role -> weight of every quantized weight of a layer (fused experts as 3-D "experts.gate_up" / "experts.down")."""
    out = {role: lin.weight for role, lin in view.linears().items()}
    if view.experts is not None:
        out["experts.gate_up"], out["experts.down"] = view.experts.gate_up, view.experts.down
    return out


def install_affine(model, adapter, transforms: AffineTransforms, qk: torch.Tensor | None = None) -> None:
    """Fold every site transform's inverse into the weights, the diagonals into norms / up rows, and install
    the online Kronecker transforms (in place). With every quantizer off the model computes the same
    function. `qk`: an orthogonal [hd, hd] applied online to Q and K after RoPE (K-cache quantization)."""
    from harness.quant import install_kv_quant, wrap_site
    from harness.rotation.fuse import OnlineTransform

    for layer in adapter.layers():
        sites = transforms.layers[layer.index] if layer.index < len(transforms.layers) else {}
        for site in sites:
            if site not in SITES:
                raise UnknownNameError("affine transform site", site, SITES)
        roles = layer.roles()
        if "qkv" in sites:
            t = sites["qkv"]
            if t.diag is not None:
                scale_vector(layer.attn_norm.weight, t.diag)  # γ <- γ ⊙ d
            inv = t.inverse_t()
            online = OnlineKronecker(t.p1, t.p2, name="qkv")
            for role, lin in (("q", layer.q), ("k", layer.k), ("v", layer.v)):
                transform_weight_input(lin.weight, t, inv)
                wrap_site(layer, role).input_transform = online
        if "o" in sites:
            t = sites["o"]
            if t.diag is not None:
                raise InvalidValueError("diagonal at the o_proj site", "given", "none (nothing to fold it into)")
            if t.p2 is not None:  # head_dim factor: on every (KV) head's values, fused into v_proj
                transform_head_values(layer.v.weight, t.p2, adapter.head_dim, layer.v.bias)
            transform_weight_input(layer.o.weight, t)
            wrap_site(layer, "o").input_transform = OnlineKronecker(t.p1, None, name="o (heads)")
        if "mlp" in sites:
            t = sites["mlp"]
            if t.diag is not None:
                scale_vector(layer.mlp_norm.weight, t.diag)
                for router in layer.router_linears:  # full-precision readers see x ⊙ d: undo it
                    scale_input_columns(router.weight, 1.0 / _f64(t.diag))
            inv = t.inverse_t()
            online = OnlineKronecker(t.p1, t.p2, name="mlp")
            for lin in layer.mlp_in:
                transform_weight_input(lin.weight, t, inv)
            for role in SITE_ROLES["mlp"]:
                if role in roles:
                    wrap_site(layer, role).input_transform = online
            if layer.experts is not None:
                transform_weight_input(layer.experts.gate_up, t, inv)
                wrap_site(layer, "experts").input_transform = online
        if "down" in sites:
            if layer.dense_mlp is None:
                raise InvalidValueError("affine site 'down'", "on a layer without a dense MLP / shared expert",
                                        "'experts_down' for routed experts")
            t = sites["down"]
            up = layer.mlp_in[1]
            if t.diag is not None:
                scale_output_rows(up.weight, t.diag, up.bias)
            transform_weight_input(layer.mlp_out[0].weight, t)
            down = next(r for r in SITE_ROLES["down"] if r in roles)
            wrap_site(layer, down).input_transform = OnlineKronecker(t.p1, t.p2, name="down")
        if "experts_down" in sites:
            if layer.experts is None:
                raise InvalidValueError("affine site 'experts_down'", "on a dense layer", "MoE layers only")
            t = sites["experts_down"]
            experts = wrap_site(layer, "experts")
            if t.diag is not None:
                inter = experts.down_proj.shape[-1]
                scale_output_rows(experts.gate_up_proj.data[:, inter:], t.diag)
            transform_weight_input(experts.down_proj, t)
            experts.down_transform = OnlineKronecker(t.p1, t.p2, name="experts down")
    if qk is not None:
        q32 = qk.to(torch.float32)
        install_kv_quant(model, [v.attn for v in adapter.layers()], None,
                         OnlineTransform(apply_fn=lambda x: x @ q32.to(x.device), name="R3"))


def experts_transform_as_pre_hook(adapter) -> None:
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


@torch.no_grad()
def quantize_weights_with_clips(adapter, fmt: Format, weight_clips: list[dict[str, torch.Tensor]]) -> None:
    """RTN of every layer weight in place, with its learned per-output-channel clip ratio where there is one."""
    for view in adapter.layers():
        clips = weight_clips[view.index] if view.index < len(weight_clips) else {}
        for role, weight in weight_roles(view).items():
            ratio = clips.get(role)
            ratio = None if ratio is None else ratio.to(weight.device, torch.float32)
            weight.copy_(clipped_fake_quant(weight.data, fmt, ratio))


def set_activation_clips(adapter, fmt: Format, act_clips: list[dict[str, float]]) -> None:
    """Each site's readers quantize their input as `fmt` with its clip ratio times the site's learned one
    (a MoE layer's experts module takes the "mlp" site's)."""
    from harness.quant import wrap_site

    for view in adapter.layers():
        clips = act_clips[view.index] if view.index < len(act_clips) else {}
        roles = view.roles()
        for site, site_roles in SITE_ROLES.items():
            if site not in clips:
                continue
            readers = [r for r in site_roles if r in roles] + (["experts"] if site == "mlp" and view.experts else [])
            for role in readers:
                wrap_site(view, role).act_format = with_clip(fmt, clips[site])


# ---- learnable clipping ----------------------------------------------------------------------------


def _groups(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """x viewed as [..., groups, group size] (one group per row for "row", the whole tensor for "tensor")."""
    if fmt.granularity == "row":
        return x.unsqueeze(-2)
    if fmt.granularity == "tensor":
        return x.reshape(*([1] * x.dim()), -1)
    n = x.shape[-1]
    if n % fmt.group_size:
        raise InvalidValueError(f"last dimension for {fmt.name} (group size {fmt.group_size})", n,
                                f"a multiple of {fmt.group_size}")
    return x.reshape(*x.shape[:-1], n // fmt.group_size, fmt.group_size)


def _element_range(fmt: Format, zero: torch.Tensor | None):
    """(low, high) of the element grid, in units of the scale."""
    if fmt.element == "int":
        if fmt.symmetric:
            return -fmt.qmax, fmt.qmax
        return -zero, fmt.levels - zero
    top = FLOAT_ELEMENTS[fmt.element].max_normal
    return -top, top


def clipped_fake_quant(x: torch.Tensor, fmt: Format | str, ratio: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fake-quantize `x` along its last dim as `fmt` with its clip ratio multiplied by `ratio`.

    `ratio` (in (0, 1]) is a scalar or has x's leading shape x.shape[:-1] (one per row: per output channel
    of a weight); the values equal harness.formats.quantize(x, fmt with clip_ratio = fmt.clip_ratio · ratio)
    for a scalar ratio. Gradients: straight-through for x inside the clipped range, and the LSQ scale
    gradient (rounded − unrounded inside, the grid end outside) through scale ∝ ratio · group range.
    """
    fmt = get_format(fmt)
    if ratio is None:
        ratio = torch.ones((), device=x.device)
    ratio = torch.as_tensor(ratio, dtype=torch.float32, device=x.device)
    if fmt.granularity == "tensor" and ratio.numel() != 1:
        raise InvalidValueError("clip ratio shape for a per-tensor format", tuple(ratio.shape), "a scalar")
    g = _groups(x.float(), fmt)
    rr = ratio.reshape(*ratio.shape, 1, 1) if ratio.dim() else ratio
    gd = g.detach()
    tensor_amax = gd.abs().amax() if fmt.scale_type == "e4m3" else None
    params = compute_params(gd * rr.detach(), fmt, tensor_amax)
    q = quantize_with_params(gd, params, fmt)
    if not (x.requires_grad or ratio.requires_grad):
        return q.reshape(x.shape).to(x.dtype)
    safe = torch.where(params.scale == 0, torch.ones_like(params.scale), params.scale)
    # the scale as a differentiable function of the group's range (amax, or max - min) and the ratio,
    # equal in value to the format's scale (its power-of-two / FP8 rounding passes straight through)
    if fmt.symmetric:
        span = g.abs().amax(dim=-1, keepdim=True)
    else:
        span = g.amax(dim=-1, keepdim=True).clamp_min(0) - g.amin(dim=-1, keepdim=True).clamp_max(0)
    span = span * rr
    s = safe * torch.where(span.detach() > 0, span / torch.where(span > 0, span, 1.0).detach(), 1.0)
    y = g / s
    low, high = _element_range(fmt, params.zero)
    yc = torch.clamp(y, low, high) if isinstance(low, float) else torch.maximum(torch.minimum(y, high), low)
    surrogate = s * (yc + (q / safe - yc).detach())
    out = q + (surrogate - surrogate.detach())
    return out.reshape(x.shape).to(x.dtype)


def with_clip(fmt: Format | None, ratio: float) -> Format | None:
    """`fmt` with its clip ratio multiplied by `ratio` (what clipped_fake_quant computes, for inference)."""
    if fmt is None:
        return None
    return dataclasses.replace(fmt, clip_ratio=min(1.0, fmt.clip_ratio * float(ratio)))
