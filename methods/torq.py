"""TORQ: Two-Level Orthogonal Rotation for MXFP4 Quantization (Xu, Hu, Yang, 2026) — reconstruction.

No code is public; this follows the paper's argument (research/papers.md A1) and records each choice.
MXFP4 shares one power-of-two scale per 32-element block, so a block holding a high-variance element
coarsens its other elements (inter-block imbalance), and heavy-tailed blocks use few E2M1 codes
(intra-block imbalance). A two-level orthogonal transform T = Q_inter (I ⊗ R) addresses both:

- Statistics, per site (the RMS-normalised residual stream read by q/k/v and gate/up of every layer, and
  each layer's down_proj input), from the calibration windows: the second moment *without massive tokens*
  (rows whose max |x| exceeds `massive_ratio` x the batch median: the attention sink), the per-channel
  max |x| over all tokens, and a seeded uniform sample of rows per reader group.
- Stage 1, inter-block (`inter`):
  * "isolate" (default, re-derived in issue #12): a channel permutation. Massive channels (max |x| above
    `massive_ratio` x the median channel's) each get a block of their own, filled with the quietest
    channels; the other channels are dealt, largest energy first, to the least-loaded remaining block,
    energies measured without massive tokens. Nothing is spread across blocks. (The first construction,
    below, equalised block energies with Givens rotations; measured on SmolLM2 it hurt: the channels it
    equalised are massive-activation channels, and each Givens pair smeared one into a second block.)
  * "givens": Schur–Horn block-energy equalisation (balancing permutation + block-pair Givens rotations,
    harness.rotation.blockstats.equalize_blocks) — the first reconstruction, kept as an ablation.
  * "klt_hadamard": the same authors' MambaQuant rotation, eigenvectors of Σ times a Hadamard (equal
    per-channel variance; global mixing) — an ablation.
  * "none".
- Stage 2, intra-block (`intra`): one R in O(32) shared by every block of a site, chosen per site among
  closed-form candidates (identity, Hadamard, sign-randomised Hadamards, in-block KLT·Hadamard) by the
  MXFP4 output error it leaves on that site's readers, Σ ||(Q(xT) − xT)(WT)ᵀ||² / ||xWᵀ||²
  (`select: output_error`, default), or by the E2M1 code entropy (`select: entropy`, the paper's named
  criterion). The chosen candidate of every site is recorded in the run's info.
- Where: T of the residual stream fused offline (QuaRot-style, norms folded); per layer, the down-site T
  online before down_proj, inverse fused into down_proj, kept as what it is, a channel permutation and one
  32 x 32 block (O(d_ff) per layer; a dense d_ff x d_ff matrix only for the dense stage-1 ablations, which the
  full-scale spec runs on the residual stream alone); V/O per head: I ⊗ R of the residual.
- Cost at scale: a down_proj site keeps its moment's diagonal, not the d_ff x d_ff matrix (stage 2's in-block
  covariance comes from the sampled non-massive rows), float32 row samples, and candidates are scored
  without forming T (harness.rotation.blockstats.TwoLevel).
  MoE experts' down inputs get I ⊗ R of the residual (no per-expert statistics).
- Training-free; weights RTN or GPTQ after the rotation.
`metrics` reports block-energy CV and code entropy before/after for the residual stream (and the mean
over layers for down_proj inputs), and the output error of the chosen transform against no rotation.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from harness.calib import SecondMoment
from harness.formats import get_format
from harness.registry import register_method
from harness.rotation.blockstats import (
    TwoLevel,
    choose_intra_block,
    coefficient_of_variation,
    e2m1_code_entropy,
    equalize_blocks,
    intra_block_candidates,
    isolating_permutation,
    klt_hadamard,
    massive_channels,
    output_error,
    pooled_block_covariance,
)
from harness.rotation.install import Rotations
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import block_diagonal, hadamard, is_hadamard_order


class _Site:
    """What one site's transform is built from: the second moment without massive tokens (the full [d, d]
    matrix only where a dense stage 1 needs it, else its diagonal: O(d) per site), per-channel max |x| over
    every token, and seeded uniform row samples per reader group (float32, each flagged massive or not).
    The readers' weights are not copied: `readers` maps a group to (the model's live weights, the norm
    scale they see)."""

    def __init__(self, dim: int, keep_fraction: float, seed: int, ratio: float, full: bool):
        self.clean = SecondMoment(dim) if full else None
        self.energy_sum = torch.zeros(dim, dtype=torch.float64)
        self.ratio, self.fraction = ratio, keep_fraction
        self.absmax = torch.zeros(dim, dtype=torch.float64)
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.sample_massive: list[torch.Tensor] = []
        self.readers: dict[str, tuple[list[torch.Tensor], torch.Tensor | None]] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.massive_rows = self.rows = 0

    def add(self, x: torch.Tensor, group: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        rowmax = x.abs().amax(-1)
        massive = rowmax > self.ratio * rowmax.median()
        if self.clean is not None:
            self.clean.add(x[~massive])
        self.energy_sum += x[~massive].pow(2).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        keep = torch.rand(x.shape[0], generator=self.generator) < self.fraction
        keep[torch.randint(x.shape[0], (1,), generator=self.generator)] = True  # every batch is represented
        self.samples.setdefault(group, []).append(x[keep].float())
        self.sample_massive.append(massive[keep])
        self.massive_rows += int(massive.sum())
        self.rows += x.shape[0]

    @property
    def energies(self) -> torch.Tensor:
        """Per-channel E[x²] without massive tokens."""
        return self.energy_sum / max(self.rows - self.massive_rows, 1)

    def pooled_block_covariance(self, inter: TwoLevel, block: int) -> torch.Tensor:
        """The in-block covariance shared by the blocks of x Q_inter (massive tokens left out): from the full
        moment where it is kept, else from the clean sampled rows."""
        if self.clean is not None:
            return pooled_block_covariance(inter.dense().T @ self.clean.cov @ inter.dense(), block)
        rows = self.rows_sample().double()[~torch.cat(self.sample_massive)]
        blocks = inter.apply(rows).reshape(-1, block)
        return blocks.T @ blocks / max(blocks.shape[0], 1)

    def pairs(self) -> list[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]]:
        """(sampled rows, reader weights, norm scale) per group, for the output error."""
        return [(torch.cat(rows), *self.readers[group]) for group, rows in self.samples.items()
                if self.readers.get(group, ([], None))[0]]

    def rows_sample(self) -> torch.Tensor:
        return torch.cat([torch.cat(r) for r in self.samples.values()])


def block_format(activation):
    """The E2M1 block format the transform is built for: the cell's activation format when it is one, else
    MXFP4 (TORQ's format)."""
    if activation is not None and activation.granularity == "group" and activation.element == "e2m1":
        return activation
    return get_format("mxfp4")


def _normalised(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@register_method("torq")
class TORQ(RotationMethod):
    """Two-level (outlier-aware inter-block permutation + intra-block rotation chosen by MXFP4 output error)
    rotations for MXFP4."""

    version = 2  # 2: outlier-aware stage 1 ("isolate"), stage 2 chosen per site by output error
    conformance_params = {"weight_solver": "rtn", "samples": 64, "candidates": 2}
    uses_seed = False  # closed form from calibration moments (fixed sampling): one cell, not one per seed

    class Params(RotationParams):
        inter: Literal["isolate", "givens", "klt_hadamard", "none"] = "isolate"  # stage 1
        intra: bool = True  # stage 2
        select: Literal["output_error", "entropy"] = "output_error"  # stage 2's criterion
        block: PositiveInt = 32
        candidates: PositiveInt = 8  # sign-randomised Hadamards among the stage-2 candidates
        samples: PositiveInt = 1024  # calibration rows kept per site (over all its reader groups)
        massive_ratio: PositiveFloat = Field(20.0, gt=1.0, le=1e6)  # "massive" = above this x the median
        online_down: bool = True  # the two-level transform before down_proj (per layer)

    # ---- the two levels -------------------------------------------------------------------------
    def _inter(self, site: _Site) -> tuple[TwoLevel, int]:
        """(Q_inter with R = identity, number of massive channels isolated)."""
        b, d = self.params.block, site.energies.numel()
        eye_b = torch.eye(b, dtype=torch.float64)
        kind = self.params.inter
        if kind == "isolate":
            massive = massive_channels(site.absmax, self.params.massive_ratio)
            return TwoLevel(isolating_permutation(site.energies, massive, b), eye_b), int(massive.numel())
        if kind == "givens":
            return TwoLevel(equalize_blocks(site.clean.cov, b), eye_b), 0
        if kind == "klt_hadamard" and is_hadamard_order(d):
            return TwoLevel(klt_hadamard(site.clean.cov, hadamard(d)), eye_b), 0
        return TwoLevel(torch.arange(d), eye_b), 0

    def _two_level(self, site: _Site, fmt) -> tuple[TwoLevel, dict]:
        b = self.params.block
        stage1, isolated = self._inter(site)
        energies = site.energies
        after = (energies[stage1.inter] if stage1.is_permutation
                 else torch.diagonal(stage1.inter.T @ site.clean.cov @ stage1.inter))
        rows = site.rows_sample()
        pairs = site.pairs()
        identity = TwoLevel(torch.arange(energies.numel()), torch.eye(b, dtype=torch.float64))
        stats = {"block_cv_before": coefficient_of_variation(energies.reshape(-1, b).sum(-1)),
                 "block_cv_after": coefficient_of_variation(after.reshape(-1, b).sum(-1)),
                 "entropy_before": e2m1_code_entropy(rows, fmt),
                 "output_error_before": output_error(pairs, identity, fmt),
                 "massive_channels": float(isolated), "massive_token_share": site.massive_rows / max(site.rows, 1)}
        choice, scores, t = "identity", {}, stage1
        if self.params.intra:
            cands = intra_block_candidates(site.pooled_block_covariance(stage1, b), hadamard(b), self.params.candidates)
            if self.params.select == "entropy":
                choice, scores = choose_intra_block(stage1.apply(rows.double()), cands, b, fmt)
            else:
                scores = {name: output_error(pairs, stage1.with_block(c), fmt) for name, c in cands.items()}
                choice = min(scores, key=scores.get)
            t = stage1.with_block(cands[choice])
        stats["entropy_after"] = e2m1_code_entropy(t.apply(rows.double()), fmt)
        stats["output_error_after"] = output_error(pairs, t, fmt)
        return t, {"stats": stats, "choice": choice, "scores": scores}

    # ---- calibration -------------------------------------------------------------------------------
    @torch.no_grad()
    def build(self, ctx):
        adapter, b, p = ctx.adapter, self.params.block, self.params
        fmt = block_format(getattr(ctx.scheme, "activation", None))
        layers = adapter.layers()
        inputs = ctx.calib_inputs()
        tokens = inputs.numel()
        residual = _Site(adapter.hidden_size, min(1.0, p.samples / (2 * len(layers) * tokens)), ctx.seed,
                         p.massive_ratio, full=True)
        dense_down = all(v.experts is None for v in layers) and p.online_down
        # a d_ff x d_ff moment per layer only for the dense stage-1 ablations (O(L d_ff²): smoke scale)
        full_down = p.inter in ("givens", "klt_hadamard")
        down = [_Site(v.mlp_out[0].in_features, min(1.0, p.samples / tokens), ctx.seed + 1 + v.index, p.massive_ratio,
                      full=full_down) for v in layers] if dense_down else []
        handles = []
        for view in layers:
            # MoE: the router and a shared expert stand for the routed experts' gate_up (not scored: cost)
            for part, norm, readers in (("attn", view.attn_norm, (view.q, view.k, view.v)),
                                        ("mlp", view.mlp_norm, (*view.mlp_in, *view.router_linears))):
                group = f"{view.index}.{part}"
                # the readers see norm(x) = x̂ · γ (γ folded into them by the rotation)
                residual.readers[group] = ([lin.weight.detach() for lin in readers], norm.weight.detach().cpu())
                handles.append(norm.register_forward_hook(
                    lambda mod, args, _out, g=group: residual.add(_normalised(mod, args[0]), g)))
            if dense_down:
                down[view.index].readers["down"] = ([view.mlp_out[0].weight.detach()], None)
                handles.append(view.mlp_out[0].register_forward_hook(
                    lambda mod, args, _out, i=view.index: down[i].add(args[0], "down")))
        try:
            for i in range(0, inputs.shape[0], 4):
                ctx.model(inputs[i:i + 4].to(next(ctx.model.parameters()).device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

        t_res, res = self._two_level(residual, fmt)
        r_res = t_res.r
        metrics = {f"residual_{k}": v for k, v in res["stats"].items()}
        choices = {"residual": res["choice"]}
        rot = Rotations(residual=t_res.dense(), head=block_diagonal(r_res, adapter.head_dim // min(b, adapter.head_dim))
                        if adapter.head_dim % b == 0 else None,
                        info={"inter": p.inter, "intra": p.intra, "select": p.select, "format": str(getattr(fmt, "name", fmt))})
        if dense_down:
            per_layer = [self._two_level(m, fmt) for m in down]
            if all(t.is_permutation for t, _ in per_layer):  # O(d_ff) per layer: permutation + one block
                rot.down_kind = "permuted_block"
                rot.down, rot.down_perm = [t.r for t, _ in per_layer], [t.inter for t, _ in per_layer]
            else:
                rot.down_kind, rot.down = "dense", [t.dense() for t, _ in per_layer]
            for key in res["stats"]:
                metrics[f"down_{key}"] = sum(s["stats"][key] for _, s in per_layer) / len(per_layer)
            choices.update({f"down.{i}": s["choice"] for i, (_, s) in enumerate(per_layer)})
        elif p.online_down:
            rot.down_kind, rot.down_block = "block", r_res
        rot.info.update(metrics=metrics, stage2_choice=choices, residual_scores=res["scores"])
        return rot
