"""CMoE (methods/cmoe.py): the carving is exact, balanced and follows the reference's construction; the
carved model is a standard Qwen2-MoE; derived aliases build once and reload bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.errors import InvalidValueError
from harness.method import CalibConfig, CalibContext, InvalidParamsError
from harness.models import get_adapter, load_model, make_tiny_model, model_info
from harness.models.adapters import Qwen2MoeAdapter
from harness.models.registry import list_models
from methods.cmoe import CMoE, CMoERouter, activation_markers, balanced_assignment, carve, marker_columns

ALL_ACTIVE = {"num_experts": 4, "shared_experts": 1, "active_experts": 3, "k_act": 8}


def calibrated(family: str, params: dict, n: int = 4, seqlen: int = 64, seed: int = 0):
    model, tok, adapter = make_tiny_model(family)
    ctx = CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=None, calib=CalibConfig("wikitext2", n, seqlen),
                       seed=seed)
    g = torch.Generator().manual_seed(1)
    ctx._inputs = torch.randint(0, len(tok), (n, seqlen), generator=g)
    method = CMoE(params)
    return method, model, adapter, method.calibrate(ctx)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@torch.no_grad()
def test_every_expert_active_reproduces_the_dense_model(family):
    """Expert weights are exact slices, the router's combine weights are 1 and the shared expert's
    sigmoid(0) x 2 = 1: with every routed expert active the carved model is the dense one."""
    reference, _, _ = make_tiny_model(family)
    ids = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(2))
    ref = reference(ids).logits
    method, model, adapter, state = calibrated(family, ALL_ACTIVE)
    carved = method.apply(model, adapter, state, None)
    out = carved(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert max(state.meta["ffn_error"] + state.meta["ffn_error_oracle"]) < 1e-5  # the diagnostic agrees


@torch.no_grad()
def test_carved_model_is_a_standard_qwen2_moe():
    method, model, adapter, state = calibrated("llama", {"num_experts": 4, "shared_experts": 1, "active_experts": 2})
    carved = method.apply(model, adapter, state, None)
    moe = get_adapter(carved)
    assert isinstance(moe, Qwen2MoeAdapter) and moe.is_moe
    info = moe.describe()["moe"]
    assert info == {"layers": [0, 1], "num_experts": 3, "top_k": 2, "expert_intermediate": 64, "shared_expert": True}
    view = moe.layer(0)
    assert isinstance(view.experts.router, CMoERouter)
    assert [lin.weight.shape for lin in view.mlp_in] == [torch.Size([64, 128])] * 2  # the shared expert
    # the router's input columns are visible to methods that transform a residual reader (rotation, smoothing)
    assert view.router_linears[0].weight.shape == (6, 128)
    metrics = method.metrics(carved, None)
    assert metrics["active_ffn_fraction"] == pytest.approx((64 + 2 * 64) / 256)


def test_partition_is_exact_balanced_and_shares_the_most_active_neurons():
    _, model, adapter, state = calibrated("llama", {"num_experts": 8, "shared_experts": 2, "active_experts": 2})
    d_ff = model.config.intermediate_size
    for shared, routed in zip(state.shared, state.routed):
        assert shared.numel() == 2 * 32 and routed.shape == (6, 32)
        every = torch.cat([shared, routed.reshape(-1)]).sort().values
        assert torch.equal(every, torch.arange(d_ff))  # a partition of the FFN's neurons
    # the shared neurons are the top activation rates (recomputed independently on layer 0's inputs)
    x = _layer0_ffn_inputs(model, adapter)
    gate, up = (lin.weight for lin in adapter.layer(0).mlp_in)
    markers = activation_markers(x, gate, up, 10)
    rates = torch.bincount(markers.reshape(-1), minlength=d_ff).float()
    shared = set(state.shared[0].tolist())
    assert rates[list(shared)].min() >= rates[[j for j in range(d_ff) if j not in shared]].max()


def _layer0_ffn_inputs(model, adapter):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
    seen = []
    h = adapter.layer(0).dense_mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen[0]


def test_markers_are_the_top_k_of_the_normalised_scores():
    torch.manual_seed(0)
    x, gate, up = torch.randn(50, 16), torch.randn(40, 16), torch.randn(40, 16)
    markers = activation_markers(x, gate, up, 5, chunk=7)
    xn, gn, un = F.normalize(x, dim=1), F.normalize(gate, dim=1), F.normalize(up, dim=1)
    h = (F.silu(xn @ gn.T) * (xn @ un.T)).abs()
    for t in range(50):
        assert set(markers[t].tolist()) == set(torch.topk(h[t], 5).indices.tolist())


@pytest.mark.parametrize("dense", [True, False])
def test_balanced_assignment_is_the_optimum_of_the_reference_formulation(dense, monkeypatch):
    from scipy.optimize import linear_sum_assignment

    import methods.cmoe as cmoe

    monkeypatch.setattr(cmoe, "DENSE_ASSIGNMENT_MAX", 10**9 if dense else 0)  # both solvers
    rng = np.random.default_rng(0)
    for n, k in ((12, 3), (40, 5), (64, 8)):
        cost = rng.integers(0, 20, size=(n, k)).astype(float)
        ours = balanced_assignment(cost, n // k)
        assert np.bincount(ours, minlength=k).tolist() == [n // k] * k
        _, col = linear_sum_assignment(np.repeat(cost, n // k, axis=1))  # lapjv's problem: centroids repeated
        assert cost[np.arange(n), ours].sum() == cost[np.arange(n), col // (n // k)].sum()


def test_kmeans_step_matches_the_reference_distances():
    """Cost and representatives from torch.cdist(p=1) on dense marker columns, as the reference computes
    them, equal the carving's (which never forms the n x n matrix)."""
    torch.manual_seed(3)
    d_ff, t, ne, ns = 32, 200, 4, 1
    markers = torch.topk(torch.rand(t, d_ff) ** 3 * torch.linspace(0.2, 1, d_ff), 4, dim=1).indices
    shared, groups, reps, rates = carve(markers, d_ff, ne, ns)
    dense = marker_columns(markers, torch.arange(d_ff), d_ff)
    rest = [j for j in range(d_ff) if j not in set(shared.tolist())]
    seeds = [rest[i] for i in torch.topk(rates[rest], ne - ns).indices.tolist()]
    dist = torch.cdist(dense[:, rest].T, dense[:, seeds].T, p=1)
    cluster = {j: c for c in range(ne - ns) for j in groups[c].tolist()}
    ours_cost = sum(dist[i, cluster[j]].item() for i, j in enumerate(rest))
    from scipy.optimize import linear_sum_assignment

    m = d_ff // ne
    _, col = linear_sum_assignment(np.repeat(dist.numpy(), m, axis=1))
    assert ours_cost == pytest.approx(dist.numpy()[np.arange(len(rest)), col // m].sum())
    for c in range(ne - ns):
        members = groups[c]
        centroid = dense[:, members].mean(1, keepdim=True)
        d = torch.cdist(centroid.T, dense[:, members].T, p=1)[0]
        assert d[(members == reps[c]).nonzero()[0, 0]] == pytest.approx(d.min().item())


def test_router_selects_by_the_analytical_score_with_unit_weights():
    torch.manual_seed(0)
    c, g = torch.randn(5, 16), torch.randn(5, 16)
    router = CMoERouter(torch.cat([c, g]), top_k=2)
    x = torch.randn(30, 16)
    logits, weights, index = router(x)
    score = ((x @ c.T) * F.silu(x @ g.T)).abs()
    assert torch.allclose(logits, score, rtol=1e-5, atol=1e-5)
    assert torch.equal(index, torch.topk(score.softmax(-1), 2).indices)
    assert torch.equal(weights, torch.ones(30, 2))
    router.extra_bias[3] = 10.0  # the load-balancing bias moves the selection only
    assert (router(x)[2] == 3).any(-1).all() and torch.equal(router(x)[1], torch.ones(30, 2))


def test_bad_params_are_one_line_errors():
    with pytest.raises(InvalidParamsError, match="active_experts=15"):
        CMoE({"num_experts": 16, "shared_experts": 2, "active_experts": 15})
    with pytest.raises(InvalidParamsError, match="shared_experts"):
        CMoE({"num_experts": 4, "shared_experts": 4})
    model, tok, adapter = make_tiny_model("llama")
    with pytest.raises(InvalidValueError, match="num_experts.*3"):
        CMoE({"num_experts": 3, "shared_experts": 1, "active_experts": 1}).shape(model.config.intermediate_size)
    moe, tok, adapter = make_tiny_model("qwen3_moe")
    ctx = CalibContext(model=moe, tokenizer=tok, adapter=adapter, scheme=None, calib=CalibConfig("wikitext2", 2, 32))
    with pytest.raises(InvalidValueError, match="qwen3_moe.*llama"):
        CMoE(ALL_ACTIVE).calibrate(ctx)


@torch.no_grad()
def test_derived_alias_builds_once_and_reloads_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_MODEL_CACHE", str(tmp_path))
    assert {"smollm2-135m-cmoe", "tiny-llama-cmoe"} <= set(list_models())
    info = model_info("tiny-llama-cmoe")
    fp = info.fingerprint()
    assert fp["kind"] == "derived" and fp["recipe"]["method"] == "cmoe" and fp["recipe"]["code"]
    assert fp["recipe"]["base_fingerprint"] == model_info("tiny-llama").fingerprint()
    model, _, adapter = load_model("tiny-llama-cmoe")
    assert isinstance(adapter, Qwen2MoeAdapter) and adapter.info.loaded_from is None
    again, _, adapter2 = load_model("tiny-llama-cmoe")
    assert adapter2.info.loaded_from is not None
    ids = torch.randint(0, 500, (1, 40))
    assert torch.equal(model(ids).logits, again(ids).logits)
    from harness.models.derived import build_info

    build = build_info(adapter2.info.loaded_from)["build"]
    assert build["base_ppl"] > 1 and build["derived_ppl"] > 1
    assert build["metrics"]["active_ffn_fraction"] == pytest.approx(0.75)
