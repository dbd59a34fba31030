"""CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context Scenarios (Wang et al., 2024,
arXiv 2409.10593; official code wln20/CSKV).

Algorithm (per decoder layer, on the FP model's calibration K/V, then a bi-branch cache):
1. Channel shrinking. k_proj (and v_proj) become a low-rank pair A: hidden -> r, B: r -> kv_hidden with
   r = density x head_dim x kv_heads (one factorization over all KV heads, not per head); the cache stores
   the r features A x only (keys before RoPE) and attention reads K = B (A x), RoPE applied after.
2. Initialization: SVD of k_proj's weight (A = √Σ_r V_rᵀ, B = U_r √Σ_r), or ASVD: the weight's input
   channels scaled by S = (mean |x| + 1e-6)^α before the SVD (α = 0.5), undone on A.
3. Layer-wise reconstruction: A and B are trained to minimise MSE(RoPE(K), RoPE(K̂)) + MSE(V, V̂) per layer
   on the FP model's inputs (teacher forcing, no LM loss).
4. Bi-branch cache: the most recent `window` tokens are read in full precision from the original
   projections, older ones from the compressed features (optionally quantized).

Every variant is a projector of the cached vectors, which is how it is implemented here (a KV codec,
`LowRankChannels`, on the attention module): with K = W x, SVD init gives B A = U_r U_rᵀ W (U_r the top
left singular vectors of W), ASVD gives the same with U_r from W·diag(S), and the minimiser of step 3's
loss is B A = U_r U_rᵀ W with U_r the top eigenvectors of the calibration cache's second moment Σ k kᵀ
(a rank-r least-squares fit of the linear target K = W X is reduced-rank regression; RoPE is orthogonal,
so the loss on rotated keys equals the loss before RoPE). `fit: least_squares` uses that closed-form
minimiser; tests/unit/test_cskv.py checks that gradient descent on (A, B) in the paper's parametrisation
from the ASVD init approaches it and never goes below it.

The scheme's KV format (none: 16-bit features) quantizes the stored features per token (groups along the
r features). Bits per K / V element in the record count the kept fraction r / kv_hidden, the format's
scales and the full-precision window.

Deviations from the reference (likely effect):
- step 3 by its exact minimiser on the calibration set instead of one epoch of Adam at lr 5e-5 (at least
  as low a calibration loss; with little calibration data it may fit that data more closely than the
  paper's short training would);
- the window slides (the newest `window` tokens are full precision at every step); the reference keeps
  a full-precision block that fills to 32 tokens and then moves to the compressed branch at once (1..32
  full tokens, 16 on average), so window 32 here keeps more full tokens than the reference's 32;
- with quantization the features are fake-quantized after the fit (post-training; the reference trains
  with quantization in the loop, QAT) and per token for keys too (its window mode quantizes keys per
  channel, KIVI-style): higher error at 2-4 bits than the paper's QAT;
- on models with a key norm after k_proj (Gemma-3's k_norm) the projector acts on the normed pre-RoPE key
  the cache holds; `svd` / `asvd` bases still come from k_proj's weight, so they ignore that norm;
- statistics from the harness calibration set (the reference: 256 x 4096 Pile tokens for ASVD, a Pile
  subset of 1024-token samples for training).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt

from harness.calib import walk_layers
from harness.errors import InvalidValueError
from harness.formats import Format, quantize
from harness.kv import KVPolicy
from harness.kv.policy import FP_BITS, stored_bits
from harness.kv.rope import unrope
from harness.kv.stats import KVRanges
from harness.method import CalibContext, Method, MethodParams
from harness.registry import register_method
from harness.state import State

ROLES = ("key", "value")
ENERGY_LEVEL = 0.9  # the "effective rank" metric: channels needed for this share of the cache's energy


@dataclass(kw_only=True)
class CSKVState(State):
    """Per decoder layer: {key: basis [kv_hidden, r_k], value: basis [kv_hidden, r_v]} (orthonormal columns)."""

    bases: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class LowRankChannels:
    """A KV codec that stores each token's vector over all KV heads as r features c = Uᵀ k (and reads
    back U c): CSKV's compressed branch. With a format, the features are quantized per token."""

    basis: torch.Tensor  # [kv_heads * head_dim, r], orthonormal columns

    def quantize(self, x: torch.Tensor, fmt: Format | None) -> torch.Tensor:
        b, h, t, d = x.shape
        u = self.basis.to(device=x.device, dtype=x.dtype)
        features = x.transpose(1, 2).reshape(b, t, h * d) @ u
        if fmt is not None:
            features = quantize(features, fmt)
        return (features @ u.T).reshape(b, t, h, d).transpose(1, 2)

    def stored_bits(self, fmt: Format | None, head_dim: int) -> float:
        """Bits per original K/V element of one stored token: r features (and their scales) over kv_hidden."""
        channels, rank = self.basis.shape
        per_feature = FP_BITS if fmt is None else stored_bits(fmt, rank)
        return per_feature * rank / channels


class KVSecondMoments(KVRanges):
    """Σ k kᵀ and Σ v vᵀ over the calibration tokens (fp64, [kv_hidden, kv_hidden]; keys before RoPE)."""

    def __init__(self, attn):
        super().__init__(attn, pre_rope_keys=True)
        self.moment: dict[str, torch.Tensor] = {}

    def _observe(self, module, query, key, value) -> None:
        key = unrope(key, *module.kv_rope)
        for role, x in (("key", key), ("value", value)):
            flat = x.detach().transpose(1, 2).reshape(-1, x.shape[1] * x.shape[-1]).double()
            m = flat.T @ flat
            self.moment[role] = m if role not in self.moment else self.moment[role] + m


class InputAbsMean:
    """ASVD's statistic: the mean |x| of each input channel of a linear over the calibration tokens."""

    def __init__(self, linear: torch.nn.Module):
        self.linear, self.total, self.count = linear, None, 0

    def __enter__(self) -> InputAbsMean:
        self.handle = self.linear.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        self.total = x.abs().sum(0) if self.total is None else self.total + x.abs().sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


def top_eigenvectors(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading eigenvectors of a symmetric PSD matrix: the best rank-r subspace of the cache."""
    values, vectors = torch.linalg.eigh(moment)
    return vectors[:, values.argsort(descending=True)[:rank]].contiguous()


def weight_basis(weight: torch.Tensor, rank: int, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """U_r of W [kv_hidden, hidden] (SVD init), or of W·diag(S) (ASVD init): B A = U_r U_rᵀ W."""
    w = weight.detach().double()
    if input_scale is not None:
        w = w * input_scale.double()[None, :]
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank].contiguous()


def energy_kept(moment: torch.Tensor, basis: torch.Tensor) -> float:
    """Share of the cache's energy Σ ||k||² the basis keeps: 1 - relative reconstruction error."""
    basis = basis.double()
    return float(torch.trace(basis.T @ moment @ basis) / torch.trace(moment))


def effective_rank(moment: torch.Tensor, level: float = ENERGY_LEVEL) -> float:
    """Fraction of the channels needed for `level` of the cache's energy (lower: more compressible)."""
    values = torch.linalg.eigvalsh(moment).flip(0).clamp_min(0)
    share = values.cumsum(0) / values.sum()
    return float((int((share < level).sum()) + 1) / len(values))


@register_method("cskv")
class CSKV(Method):
    """Low-rank channel shrinking of the K and V cache with a full-precision window of recent tokens."""

    version = 1
    state_type = CSKVState

    class Params(MethodParams):
        key_density: float = Field(0.5, gt=0, le=1)  # kept share of the key channels (README: 0.5)
        value_density: float = Field(0.5, gt=0, le=1)  # kept share of the value channels
        fit: Literal["least_squares", "asvd", "svd"] = "least_squares"  # trained (its minimiser), or an init
        window: NonNegativeInt = 32  # most recent tokens read in full precision (reference: 32)
        asvd_alpha: float = Field(0.5, gt=0)  # S = (mean |x| + 1e-6)^alpha
        batch_size: PositiveInt = 8  # calibration windows per forward

    def rank(self, role: str, geometry) -> int:
        per_head = max(1, round(getattr(self.params, f"{role}_density") * geometry.head_dim))
        return per_head * geometry.num_kv_heads

    def kv_formats(self, scheme: Any) -> tuple[Format | None, Format | None]:
        """The formats of the stored K and V features: the scheme's KV formats, or none (16-bit features)."""
        kv = getattr(scheme, "kv", None)
        if isinstance(kv, KVPolicy):
            if kv != KVPolicy(key=kv.key, value=kv.value):
                raise InvalidValueError("scheme kv for cskv", kv.to_dict(),
                                        "formats only: cskv sets the window and the compressed branch itself")
            formats = (kv.key, kv.value)
        else:
            formats = (kv, kv)
        for fmt in formats:
            if fmt is not None and fmt.granularity not in ("row", "group"):
                raise InvalidValueError("kv format for cskv features", fmt.name, "a per-row or per-group format")
        return formats

    def policy(self, scheme: Any) -> KVPolicy:
        key, value = self.kv_formats(scheme)
        return KVPolicy(key=key, value=value, window=self.params.window, pre_rope_keys=True, compressed=ROLES)

    def calib_scheme_key(self, scheme: Any) -> Any:
        return None  # the bases do not depend on the feature format

    @torch.no_grad()
    def calibrate(self, ctx: CalibContext) -> CSKVState:
        from harness.quant import install_kv_quant

        p = self.params
        views = ctx.adapter.layers()
        install_kv_quant(ctx.model, [v.attn for v in views], None)  # the wrapper that shows K/V to observers
        geometry = ctx.adapter.attention
        bases, kept, eff = [], {r: [] for r in ROLES}, {r: [] for r in ROLES}
        for step in walk_layers(ctx.model, ctx.adapter, ctx.calib_inputs(), p.batch_size,
                                progress=ctx.progress, desc="CSKV layers"):
            with KVSecondMoments(step.view.attn) as moments, InputAbsMean(step.view.k) as inputs:
                step.run()
            layer = {}
            for role in ROLES:
                rank, moment = self.rank(role, geometry), moments.moment[role]
                weight = (step.view.k if role == "key" else step.view.v).weight
                if p.fit == "least_squares":
                    basis = top_eigenvectors(moment, rank)
                elif p.fit == "asvd":
                    basis = weight_basis(weight, rank, (inputs.mean + 1e-6) ** p.asvd_alpha)
                else:
                    basis = weight_basis(weight, rank)
                layer[role] = basis.float()
                kept[role].append(energy_kept(moment, basis))
                eff[role].append(effective_rank(moment))
            bases.append(layer)
        meta = {"key_rank": self.rank("key", geometry), "value_rank": self.rank("value", geometry)}
        for role in ROLES:
            meta[f"{role}_energy_kept"] = sum(kept[role]) / len(kept[role])
            meta[f"{role}_effective_rank"] = sum(eff[role]) / len(eff[role])
        return CSKVState(bases=bases, meta=meta)

    @torch.no_grad()
    def apply(self, model, adapter, state: CSKVState, scheme):
        from harness.quant import apply_scheme

        apply_scheme(model, adapter, dataclasses.replace(scheme, kv=self.policy(scheme)), quantize_weights=True)
        for view, layer in zip(adapter.layers(), state.bases):
            view.attn.kv_codecs = {role: LowRankChannels(layer[role]) for role in ROLES}
        self._metrics = {k: v for k, v in state.meta.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return model

    def metrics(self, model, ctx) -> dict[str, float]:
        return getattr(self, "_metrics", {})
