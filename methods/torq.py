"""TORQ: Two-Level Orthogonal Rotation for MXFP4 Quantization (Xu, Hu, Yang, 2026) — reconstruction.

No code is public; this follows the paper's text (research/papers.md A1) and records each choice:
- Statistics: second moments of the activations the quantizers see, from calibration data: the
  RMS-normalised residual stream (norm scales are folded into the weights), pooled over every
  attention and MLP input of every layer; and, per layer, the input of down_proj.
- Stage 1, inter-block variance equalisation (Schur–Horn): an orthogonal Q_inter made of a balancing
  channel permutation and block-pair Givens rotations that makes every 32-block's energy equal
  (harness.rotation.blockstats.equalize_blocks).
- Stage 2, intra-block max-entropy rotation: one R in O(32) shared by all blocks, the candidate
  (identity, Hadamard, sign-randomised Hadamards, in-block KLT·Hadamard) that maximises the entropy of
  the E2M1 code histogram of the MXFP4-quantized calibration activations after stage 1.
- Where: T = Q_inter (I ⊗ R) fused into the residual stream (offline); per layer, the same two-level
  construction online before down_proj (dense, inverse fused into down_proj); V/O per head: I ⊗ R.
  MoE experts' down inputs get I ⊗ R of the residual (no per-expert statistics).
- Training-free: closed form from second moments; weights RTN or GPTQ after rotation.
`metrics` reports block-energy CV and code entropy before/after for the residual stream (and the
mean over layers for down_proj inputs).
"""
from __future__ import annotations

import torch
from pydantic import PositiveInt

from harness.calib import RowSample, SecondMoment
from harness.registry import register_method
from harness.rotation.blockstats import (
    block_energies,
    choose_intra_block,
    coefficient_of_variation,
    e2m1_code_entropy,
    equalize_blocks,
    intra_block_candidates,
    pooled_block_covariance,
)
from harness.rotation.install import Rotations
from harness.rotation.method import RotationMethod, RotationParams
from harness.transforms import block_diagonal, hadamard


class _Moments:
    """Σ = E[x xᵀ] over rows, plus a seeded sample of rows for the entropy criterion."""

    def __init__(self, dim: int, keep: int, seed: int):
        self.second, self.rows = SecondMoment(dim), RowSample(keep, seed)

    def add(self, x: torch.Tensor) -> None:
        self.second.add(x)
        self.rows.add(x)

    @property
    def cov(self) -> torch.Tensor:
        return self.second.cov

    def sample(self) -> torch.Tensor:
        return self.rows.sample()


def _normalised(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@register_method("torq")
class TORQ(RotationMethod):
    """Two-level (inter-block Schur–Horn equalisation + intra-block max-entropy) rotations for MXFP4."""

    version = 1
    conformance_params = {"weight_solver": "rtn", "samples": 64, "candidates": 2}
    uses_seed = False  # closed form from calibration moments (fixed sampling): one cell, not one per seed

    class Params(RotationParams):
        inter: bool = True  # stage 1
        intra: bool = True  # stage 2
        block: PositiveInt = 32
        candidates: PositiveInt = 8  # sign-randomised Hadamards among the stage-2 candidates
        samples: PositiveInt = 1024  # calibration rows kept for the entropy criterion
        online_down: bool = True  # the two-level transform before down_proj (per layer)

    def _two_level(self, moments: _Moments, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        b = self.params.block
        cov = moments.cov
        d = cov.shape[0]
        q_inter = equalize_blocks(cov, b) if self.params.inter else torch.eye(d, dtype=torch.float64)
        cov1 = q_inter.T @ cov @ q_inter
        rows = moments.sample() @ q_inter
        stats = {"block_cv_before": coefficient_of_variation(block_energies(cov, b)),
                 "block_cv_after": coefficient_of_variation(block_energies(cov1, b)),
                 "entropy_before": e2m1_code_entropy(moments.sample())}
        r = torch.eye(b, dtype=torch.float64)
        if self.params.intra:
            cands = intra_block_candidates(pooled_block_covariance(cov1, b), hadamard(b), self.params.candidates)
            best, _ = choose_intra_block(rows, cands, b)
            r = cands[best]
        t = q_inter @ block_diagonal(r, d // b)
        stats["entropy_after"] = e2m1_code_entropy(moments.sample() @ t)
        return t, r, stats

    @torch.no_grad()
    def build(self, ctx):
        adapter, b = ctx.adapter, self.params.block
        layers = adapter.layers()
        residual = _Moments(adapter.hidden_size, self.params.samples, ctx.seed)
        dense_down = all(v.experts is None for v in layers) and self.params.online_down
        down = [_Moments(v.mlp_out[0].in_features, self.params.samples, ctx.seed + 1 + v.index)
                for v in layers] if dense_down else []
        handles = []
        for view in layers:
            for norm in (view.attn_norm, view.mlp_norm):
                handles.append(norm.register_forward_hook(
                    lambda mod, args, _out: residual.add(_normalised(mod, args[0]))))
            if dense_down:
                handles.append(view.mlp_out[0].register_forward_hook(
                    lambda mod, args, _out, i=view.index: down[i].add(args[0])))
        inputs = ctx.calib_inputs()
        try:
            for i in range(0, inputs.shape[0], 4):
                ctx.model(inputs[i:i + 4].to(next(ctx.model.parameters()).device), use_cache=False)
        finally:
            for h in handles:
                h.remove()

        t_res, r_res, stats = self._two_level(residual, ctx.seed)
        metrics = {f"residual_{k}": v for k, v in stats.items()}
        rot = Rotations(residual=t_res, head=block_diagonal(r_res, adapter.head_dim // min(b, adapter.head_dim))
                        if adapter.head_dim % b == 0 else None,
                        info={"inter": self.params.inter, "intra": self.params.intra})
        if dense_down:
            per_layer = [self._two_level(m, ctx.seed) for m in down]
            rot.down_kind, rot.down = "dense", [t for t, _, _ in per_layer]
            for key in ("block_cv_before", "block_cv_after", "entropy_before", "entropy_after"):
                metrics[f"down_{key}"] = sum(s[key] for _, _, s in per_layer) / len(per_layer)
        elif self.params.online_down:
            rot.down_kind, rot.down_block = "block", r_res
        rot.info["metrics"] = metrics
        return rot
