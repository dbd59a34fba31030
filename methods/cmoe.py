"""CMoE: Converting Mixture-of-Experts from Dense to Accelerate LLM Inference (Pei et al., arXiv 2502.04416;
ACL 2026 "Analytical FFN-to-MoE Restructuring via Activation Pattern Analysis"; official code
JarvisPei/CMoE, read before implementing).

Training-free carving of every dense SwiGLU FFN (d_ff neurons) into N experts of m = d_ff / N neurons,
layer by layer, each layer calibrated on the outputs of the layers already carved:
1. Activation scores on the calibration tokens: h_j = silu(x̂·ĝ_j) · (x̂·û_j), with x̂ the L2-normalised FFN
   input and ĝ_j, û_j the L2-normalised rows of gate_proj / up_proj.
2. ATopK markers: per token the K_a neurons of largest |h_j| are marked (a binary tokens x d_ff matrix);
   a neuron's activation rate μ_j is the fraction of tokens that mark it.
3. Shared experts: the N_s·m neurons of highest μ form one always-active shared expert.
4. Routed experts: the other neurons are split into N − N_s clusters of exactly m by one balanced k-means
   step: centroids = the marker columns of the N − N_s highest-μ remaining neurons, L1 (Hamming) distance
   between marker columns, a balanced assignment (each centroid repeated m times: a linear assignment);
   then the centroids become the cluster means and each cluster's representative neuron is the member
   nearest (L1) to its mean.
5. Analytical router over the routed experts: C = normalize(W_up[rep]), G = normalize(W_gate[rep]);
   score s = |(x·Cᵀ) ⊙ silu(x·Gᵀ)| (x not normalised), p = softmax(s) in fp32, top-N_a experts by
   p + extra_bias, combine weight 1 + p·extra_scale with extra_scale = 0: training-free, every selected
   expert counts exactly once (a plain sum of exact slices of the dense FFN), plus the shared expert.
Expert weights are exact slices of gate/up rows and down columns: with every routed expert active the
carved FFN equals the dense one (tests/unit/test_cmoe.py).

The result is a standard transformers Qwen2-MoE model (harness.models.adapters.convert): fused routed
experts, the shared neurons as its shared expert (its sigmoid gate at 0 and its down_proj doubled:
sigmoid(0) x 2 = 1 exactly), and CMoE's router in the router slot (`CMoERouter`). The mapping, and why the
router is not Qwen2-MoE's own: Qwen2-MoE routes by softmax(W x) and weighs the top-k experts by their
probabilities; CMoE's score is a product of two projections (no single linear map gives it) and its
combine weights are 1. The router keeps both matrices in one `weight` [2E, H] (C rows, then G rows), so
every method that transforms a router's input columns (rotation, smoothing, norm folding) transforms
both; the router stays in full precision like any router.

Settings S{N_s}A{N_a}E{N}; the paper's default S2A2E16 activates (2 + 2) / 16 = 25% of the FFN neurons.
`partition: random` and `router: random` are the ablations (a random balanced partition with random
representatives; a router of random unit rows).

Deviations from the reference (likely effect):
- statistics from all calibration tokens the harness gives (the reference: its first batch, 8 x 2048
  WikiText-2 tokens); with the paper's calibration (`calib: {corpus: wikitext2, n: 8, seqlen: 2048}`) the
  same data;
- the balanced assignment is solved by scipy's exact linear assignment instead of lapjv (the same
  problem and optimum; among tied optima — integer costs tie often — another partition may be chosen);
  past 16384 neurons as the equivalent transportation problem (memory n x k instead of n^2);
- the optional fine-tuning (LoRA on every linear + extra_scale, with the aux-loss-free extra_bias update)
  is not implemented: training-free CMoE only (the paper's training-free rows);
- computed in float32 (the reference: bf16) — marker ties at bf16 resolution may break differently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveInt, model_validator
from torch import nn

from harness.calib import walk_layers
from harness.method import CalibContext, Method, MethodParams
from harness.models.adapters.convert import (MoEShape, check_convertible, moe_block, moe_config,
                                             standalone_config, to_moe_model)
from harness.registry import register_method
from harness.state import State


# ---- the router ---------------------------------------------------------------------------------
class CMoERouter(nn.Module):
    """CMoE's analytical router in the Qwen2-MoE router interface: forward(x) -> (router_logits [T, E],
    top-k weights [T, k], top-k indices [T, k]). `weight` [2E, H] holds C (classifier) then G (gate)."""

    def __init__(self, weight: torch.Tensor, top_k: int):
        super().__init__()
        self.num_experts = weight.shape[0] // 2
        self.top_k = top_k
        self.hidden_dim = weight.shape[1]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.extra_scale = nn.Parameter(torch.zeros(self.num_experts, dtype=weight.dtype), requires_grad=False)
        self.register_buffer("extra_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    @classmethod
    def empty(cls, num_experts: int, hidden: int, top_k: int, dtype: torch.dtype = torch.float32) -> CMoERouter:
        return cls(torch.zeros(2 * num_experts, hidden, dtype=dtype), top_k)

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_dim)
        c, g = F.linear(x, self.weight).chunk(2, dim=-1)
        scores = (c * F.silu(g)).abs()
        probs = scores.softmax(dim=-1, dtype=torch.float32)
        index = torch.topk(probs + self.extra_bias, self.top_k, dim=-1).indices
        weights = (1 + probs * self.extra_scale.float()).gather(1, index)
        return scores, weights.to(x.dtype), index


def install_routers(model: nn.Module) -> None:
    """Put empty CMoE routers into a Qwen2-MoE model built from a carved model's config (before loading
    its saved weights): the derived-model cache rebuilds carved models this way."""
    from harness.models import get_adapter

    for view in get_adapter(model).layers():
        if view.experts is not None:
            gate = view.experts.router
            view.replace_site("router", CMoERouter.empty(gate.num_experts, gate.hidden_dim, gate.top_k,
                                                         gate.weight.dtype))


# ---- the algorithm ------------------------------------------------------------------------------
def activation_markers(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, k_act: int,
                       chunk: int = 4096) -> torch.Tensor:
    """Step 1-2: per token, the indices of its K_a most active neurons [T, K_a] (the marker matrix, sparse)."""
    g, u = F.normalize(gate.float(), dim=1), F.normalize(up.float(), dim=1)
    out = []
    for i in range(0, x.shape[0], chunk):
        xn = F.normalize(x[i:i + chunk].float(), dim=-1)
        h = F.silu(xn @ g.T) * (xn @ u.T)
        out.append(torch.topk(h.abs(), k_act, dim=-1).indices)
    return torch.cat(out)


def marker_columns(markers: torch.Tensor, neurons: torch.Tensor, d_ff: int) -> torch.Tensor:
    """The dense binary marker columns of `neurons` [T, len(neurons)] (float32)."""
    t = markers.shape[0]
    dense = torch.zeros(t, d_ff, dtype=torch.float32)
    dense.scatter_(1, markers, 1.0)
    return dense[:, neurons]


#: above this many neurons the repeated n x n cost matrix (float64) is too big; solve the transportation form
DENSE_ASSIGNMENT_MAX = 16384


def balanced_assignment(cost: np.ndarray, size: int) -> np.ndarray:
    """The cluster of each row (n rows, k clusters of exactly `size`) minimising the total cost: the
    reference's problem (lapjv on the cost with each cluster's column repeated `size` times), solved by
    scipy's exact linear assignment; past DENSE_ASSIGNMENT_MAX rows (d_ff of 70B models) as the equivalent
    transportation problem (n x k variables; HiGHS dual simplex returns a vertex, integral here)."""
    from scipy.optimize import linear_sum_assignment, linprog
    from scipy.sparse import coo_matrix, vstack

    n, k = cost.shape
    if n != k * size:
        raise ValueError(f"balanced assignment: {n} rows do not fill {k} clusters of {size}")
    if n <= DENSE_ASSIGNMENT_MAX:
        _, col = linear_sum_assignment(np.repeat(cost, size, axis=1))
        return col // size
    var = np.arange(n * k)
    each_row = coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), var)), shape=(n, n * k))
    each_cluster = coo_matrix((np.ones(n * k), (np.tile(np.arange(k), n), var)), shape=(k, n * k))
    res = linprog(cost.reshape(-1), A_eq=vstack([each_row, each_cluster]).tocsr(),
                  b_eq=np.concatenate([np.ones(n), np.full(k, size)]), bounds=(0, 1), method="highs-ds")
    x = res.x.reshape(n, k) if res.status == 0 else None
    if x is None or not np.all(np.abs(x - np.round(x)) < 1e-6):
        raise RuntimeError(f"balanced assignment of {n} neurons: no integral optimum ({res.message})")
    return x.argmax(1)


def carve(markers: torch.Tensor, d_ff: int, num_experts: int, shared_experts: int,
          partition: str = "kmeans", generator: torch.Generator | None = None):
    """Steps 2-4: (shared neurons [N_s·m], routed experts [N − N_s, m], representatives [N − N_s], rates)."""
    m = d_ff // num_experts
    k = num_experts - shared_experts
    counts = torch.bincount(markers.reshape(-1), minlength=d_ff).float()
    rates = counts / markers.shape[0]
    shared = torch.topk(rates, m * shared_experts).indices.sort().values
    is_shared = torch.zeros(d_ff, dtype=torch.bool)
    is_shared[shared] = True
    rest = torch.nonzero(~is_shared).squeeze(1)  # ascending, as the reference's set order for ints
    if partition == "random":
        perm = rest[torch.randperm(rest.numel(), generator=generator)]
        groups = perm.reshape(k, m).sort(dim=1).values
        reps = groups[torch.arange(k), torch.randint(0, m, (k,), generator=generator)]
        return shared, groups, reps, rates
    cols = marker_columns(markers, rest, d_ff)  # [T, n]
    seeds = torch.topk(rates[rest], k).indices
    centroids = cols[:, seeds]  # binary columns of the k most active remaining neurons
    # L1 between binary u and c (c binary here): |u| + |c| - 2 u·c
    cost = cols.sum(0)[:, None] + centroids.sum(0)[None, :] - 2 * (cols.T @ centroids)
    assign = torch.as_tensor(balanced_assignment(cost.double().numpy(), m))
    groups, reps = [], []
    for c in range(k):
        members = torch.nonzero(assign == c).squeeze(1)
        mean = cols[:, members].mean(1)
        # L1 between binary u and the mean centroid c̄: Σ c̄ + u·(1 − 2 c̄)
        dist = mean.sum() + cols[:, members].T @ (1 - 2 * mean)
        groups.append(rest[members])
        reps.append(rest[members[torch.argmin(dist)]])
    return shared, torch.stack(groups), torch.stack(reps), rates


def router_weight(gate: torch.Tensor, up: torch.Tensor, reps: torch.Tensor, kind: str = "analytical",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 5: [C; G] = [normalize(W_up[rep]); normalize(W_gate[rep])] (or random unit rows)."""
    if kind == "random":
        rand = torch.randn(2 * reps.numel(), gate.shape[1], generator=generator, dtype=torch.float32)
        return F.normalize(rand, dim=1).to(gate.dtype)
    return torch.cat([F.normalize(up[reps], dim=1), F.normalize(gate[reps], dim=1)])


# ---- the method ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CMoEState(State):
    shared: list[torch.Tensor] = field(default_factory=list)  # per layer [N_s·m] neuron indices
    routed: list[torch.Tensor] = field(default_factory=list)  # per layer [N − N_s, m]
    router: list[torch.Tensor] = field(default_factory=list)  # per layer [2 (N − N_s), H]


@register_method("cmoe")
class CMoE(Method):
    """Dense FFNs -> shared + routed experts with an analytical router (training-free)."""

    version = 1
    state_type = CMoEState
    uses_scheme = False  # a structural conversion in full precision; quantize the carved model afterwards
    uses_seed = False  # deterministic (the random ablations draw from the calibration seed)
    restore_structure = staticmethod(install_routers)  # rebuilding a saved carved model (harness.models.derived)
    conformance_params = {"num_experts": 4, "shared_experts": 1, "active_experts": 1, "k_act": 4}

    class Params(MethodParams):
        num_experts: PositiveInt = 16  # N: shared + routed, each d_ff / N neurons
        shared_experts: NonNegativeInt = 2  # N_s
        active_experts: PositiveInt = 2  # N_a: routed experts per token
        k_act: PositiveInt = 10  # K_a of the ATopK markers
        partition: Literal["kmeans", "random"] = "kmeans"
        router: Literal["analytical", "random"] = "analytical"

        @model_validator(mode="after")
        def _counts(self):
            if not 0 <= self.shared_experts < self.num_experts:
                raise ValueError(f"shared_experts={self.shared_experts} must be in [0, num_experts={self.num_experts})")
            if self.active_experts > self.num_experts - self.shared_experts:
                raise ValueError(f"active_experts={self.active_experts} exceeds the "
                                 f"{self.num_experts - self.shared_experts} routed experts")
            return self

    def shape(self, d_ff: int) -> MoEShape:
        p = self.params
        if d_ff % p.num_experts:
            from harness.errors import InvalidValueError

            divisors = [n for n in range(2, 65) if d_ff % n == 0]
            raise InvalidValueError(f"num_experts (d_ff = {d_ff} must be a multiple)", p.num_experts, divisors)
        m = d_ff // p.num_experts
        return MoEShape(p.num_experts - p.shared_experts, p.active_experts, m, m * p.shared_experts)

    def calibrate(self, ctx: CalibContext) -> CMoEState:
        p = self.params
        model, adapter = ctx.model, ctx.adapter
        check_convertible(model.config)
        shape = self.shape(model.config.intermediate_size)
        config = standalone_config(moe_config(model.config, shape))
        gen = torch.Generator().manual_seed(ctx.seed)
        state = CMoEState(meta={"setting": f"S{p.shared_experts}A{p.active_experts}E{p.num_experts}",
                                "active_fraction": (shape.shared_size + shape.top_k * shape.expert_size)
                                / model.config.intermediate_size,
                                "load_cv": [], "shared_rate": [], "ffn_error": [], "ffn_error_oracle": []})
        for step in walk_layers(model, adapter, ctx.calib_inputs(), batch_size=8, progress=ctx.progress,
                                desc="cmoe"):
            view = step.view
            (gate, up), down = [lin.weight for lin in view.mlp_in], view.mlp_out[0].weight
            x = _ffn_inputs(step, view)
            markers = activation_markers(x, gate, up, p.k_act)
            shared, routed, reps, rates = carve(markers, gate.shape[0], p.num_experts, p.shared_experts,
                                                p.partition, gen)
            weight = router_weight(gate, up, reps, p.router, gen)
            state.shared.append(shared)
            state.routed.append(routed)
            state.router.append(weight)
            block = moe_block(config, gate, up, down, routed.tolist(), shared.tolist(),
                              CMoERouter(weight.clone(), shape.top_k))
            # the next layer sees this layer carved (the reference's carve_inp = moe_out)
            view.replace_site("mlp", block)
            try:
                step.run()
            finally:
                view.replace_site("mlp", view.dense_mlp)
            index = block.gate(x)[2]
            load = torch.bincount(index.reshape(-1), minlength=shape.num_experts).float()
            state.meta["load_cv"].append(float(load.std() / load.mean()))
            state.meta["shared_rate"].append(float(rates[shared].sum() / rates.sum()))
            routed_err, oracle_err = routing_errors(x, gate, up, down, shared, routed, index)
            state.meta["ffn_error"].append(routed_err)
            state.meta["ffn_error_oracle"].append(oracle_err)
        return state

    def apply(self, model, adapter, state: CMoEState, scheme):
        self._meta = state.meta
        shape = self.shape(model.config.intermediate_size)
        config = moe_config(model.config, shape)
        blocks = []
        for view, shared, routed, weight in zip(adapter.layers(), state.shared, state.routed, state.router):
            (gate, up), down = [lin.weight.data for lin in view.mlp_in], view.mlp_out[0].weight.data
            router = CMoERouter(weight.to(gate.dtype).clone(), shape.top_k)
            blocks.append(moe_block(config, gate, up, down, routed.tolist(), shared.tolist(), router))
        return to_moe_model(model, blocks, shape)

    def metrics(self, model, ctx) -> dict[str, float]:
        """The carved FFN's active fraction (shared + top-k routed neurons over d_ff) and, from the
        calibration, the routed load's coefficient of variation and the shared neurons' share of markers."""
        meta = getattr(self, "_meta", None) or {}
        c = model.config
        active = meta.get("active_fraction",
                          (c.shared_expert_intermediate_size + c.num_experts_per_tok * c.moe_intermediate_size)
                          / c.intermediate_size)
        out = {"active_ffn_fraction": float(active), "routed_experts": float(c.num_experts),
               "active_routed_experts": float(c.num_experts_per_tok)}
        if meta.get("load_cv"):
            out["calib_load_cv"] = float(np.mean(meta["load_cv"]))
            out["shared_rate_fraction"] = float(np.mean(meta["shared_rate"]))
        if meta.get("ffn_error"):
            out["calib_ffn_error"] = float(np.mean(meta["ffn_error"]))
            out["calib_ffn_error_oracle"] = float(np.mean(meta["ffn_error_oracle"]))
        return out


@torch.no_grad()
def routing_errors(x: torch.Tensor, gate, up, down, shared, routed, index, chunk: int = 1024) -> tuple[float, float]:
    """Mean relative error ||carved FFN(x) - dense FFN(x)|| / ||dense FFN(x)|| over tokens, with the router's
    expert choice and with an oracle's (the top-k routed experts by the norm of their actual output): how
    much of the loss is the router's and how much the partition's (a diagnostic, not in the paper)."""
    errs, oracle_errs = [], []
    k = index.shape[1]
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk].float()
        act = F.silu(xs @ gate.float().T) * (xs @ up.float().T)
        dense = act @ down.float().T
        base = act[:, shared] @ down[:, shared].float().T
        parts = torch.stack([act[:, r] @ down[:, r].float().T for r in routed], 1)  # [t, E, H]
        for sel, out in ((index[i:i + chunk], errs), (parts.norm(dim=-1).topk(k, dim=1).indices, oracle_errs)):
            y = base + parts.gather(1, sel[:, :, None].expand(-1, -1, parts.shape[-1])).sum(1)
            out.append((y - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-12))
    return float(torch.cat(errs).mean()), float(torch.cat(oracle_errs).mean())


def _ffn_inputs(step, view) -> torch.Tensor:
    """The FFN inputs (the MLP norm's outputs) of this step's calibration tokens, as the layer is now [T, H]."""
    seen: list[torch.Tensor] = []
    handle = view.dense_mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        step.forward()
    finally:
        handle.remove()
    return torch.cat(seen)
