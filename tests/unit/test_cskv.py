"""CSKV: a low-rank projector of the K/V cache with a full-precision window; the least-squares fit is the
minimiser the paper's layer-wise training approaches; window evaluation = token-by-token decoding."""
from __future__ import annotations

import pytest
import torch

from harness.errors import InvalidValueError
from harness.kv import install_kv_policy, kv_accounting, policy_cache
from harness.method import CalibConfig, CalibContext
from harness.models.tiny import make_tiny_model
from harness.quant import get_scheme
from harness.registry import get_method
from methods.cskv import LowRankChannels, energy_kept, top_eigenvectors, weight_basis


def _ctx(model, tok, adapter, scheme):
    return CalibContext(model=model, tokenizer=tok, adapter=adapter, scheme=get_scheme(scheme),
                        calib=CalibConfig(corpus="c4", n=4, seqlen=32), seed=0)


def _ids(tok, n=30):
    return torch.randint(3, tok.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))


def _decode(model, adapter, policy, ids):
    attn = [view.attn for view in adapter.layers()]
    install_kv_policy(attn, None)  # the cache stores the policy; attention reads it as it is
    cache = policy_cache(policy, attn)
    steps = [model(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.tensor([[t]])).logits[:, -1]
             for t in range(ids.shape[1])]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("scheme", ["w16a16", "kv4"])
def test_cskv_cache_equals_token_by_token_decoding(family, scheme):
    model, tok, adapter = make_tiny_model(family, dtype=torch.float64)
    method = get_method("cskv")({"key_density": 0.25, "value_density": 0.5, "window": 6})
    scheme = get_scheme(scheme)
    state = method.calibrate(_ctx(model, tok, adapter, scheme))
    kv_hidden = adapter.attention.num_kv_heads * adapter.head_dim
    assert state.bases[0]["key"].shape == (kv_hidden, kv_hidden // 4)
    ids = _ids(tok)
    with torch.no_grad():
        fp = model(ids).logits
        method.apply(model, adapter, state, scheme)
        window = model(ids).logits
        steps = _decode(model, adapter, method.policy(scheme), ids)
    torch.testing.assert_close(window, steps, rtol=1e-9, atol=1e-9)
    assert (window - fp).abs().max() > 1e-4
    # query t reads key j compressed once j <= t - window: the first `window` queries read only full entries
    torch.testing.assert_close(window[:, :6], fp[:, :6], rtol=1e-9, atol=1e-9)
    assert (window[:, 6] - fp[:, 6]).abs().max() > 1e-6


@pytest.mark.parametrize("fit", ["least_squares", "svd", "asvd"])
def test_full_density_is_exact(fit):
    model, tok, adapter = make_tiny_model("llama", dtype=torch.float64)
    method = get_method("cskv")({"key_density": 1.0, "value_density": 1.0, "window": 0, "fit": fit})
    scheme = get_scheme("w16a16")
    ids = _ids(tok)
    with torch.no_grad():
        fp = model(ids).logits
        method.apply(model, adapter, method.calibrate(_ctx(model, tok, adapter, scheme)), scheme)
        torch.testing.assert_close(model(ids).logits, fp, rtol=1e-5, atol=1e-5)  # the basis is stored in fp32


def test_least_squares_keeps_the_most_cache_energy_and_asvd_is_a_projector_of_w_s():
    torch.manual_seed(0)
    hidden, kv, rank = 24, 8, 3
    x = torch.randn(2000, hidden, dtype=torch.float64) * torch.logspace(0, 1.5, hidden, dtype=torch.float64)
    w = torch.randn(kv, hidden, dtype=torch.float64)
    k = x @ w.T
    moment = k.T @ k
    best = energy_kept(moment, top_eigenvectors(moment, rank))
    s = x.abs().mean(0) ** 0.5
    for basis in (weight_basis(w, rank), weight_basis(w, rank, s)):
        assert energy_kept(moment, basis) < best
    # ASVD's factors as the reference builds them: SVD of diag(S) Wᵀ, S undone on A: B A = U_r U_rᵀ W
    u, sv, vt = torch.linalg.svd(torch.diag(s) @ w.T, full_matrices=False)
    a = (torch.diag(1 / s) @ u[:, :rank] @ torch.diag(sv[:rank].sqrt())).T
    b = (torch.diag(sv[:rank].sqrt()) @ vt[:rank]).T
    basis = weight_basis(w, rank, s)
    torch.testing.assert_close(b @ a, basis @ basis.T @ w)


def test_gradient_training_of_the_paper_factors_approaches_the_closed_form_and_never_beats_it():
    """The paper trains A: hidden -> r and B: r -> kv on the MSE of the reconstructed cache; from the ASVD
    init the loss falls toward the least-squares projector's and stays above it."""
    torch.manual_seed(0)
    hidden, kv, rank = 32, 12, 4
    x = torch.randn(4000, hidden, dtype=torch.float64) * torch.logspace(0, 1, hidden, dtype=torch.float64)
    w = torch.randn(kv, hidden, dtype=torch.float64) / hidden ** 0.5
    k = x @ w.T
    moment = k.T @ k
    u = top_eigenvectors(moment, rank)
    closed = float(((k - k @ u @ u.T) ** 2).mean())
    s = x.abs().mean(0) ** 0.5
    basis = weight_basis(w, rank, s)
    init = float(((k - k @ basis @ basis.T) ** 2).mean())
    a = (basis.T @ w).clone().requires_grad_()  # B A = U Uᵀ W: A = Uᵀ W, B = U
    b = basis.clone().requires_grad_()
    opt = torch.optim.Adam([a, b], lr=1e-2)
    losses = []
    for _ in range(1500):
        loss = ((k - x @ a.T @ b.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert min(losses) >= closed * (1 - 1e-6)
    assert losses[-1] - closed < 0.1 * (init - closed)


def test_accounting_counts_the_kept_fraction_scales_and_the_window():
    model, tok, adapter = make_tiny_model("llama", dtype=torch.float64)
    method = get_method("cskv")({"key_density": 0.25, "value_density": 0.5, "window": 16})
    for scheme, feature_bits in (("w16a16", 16.0), ("kv4", 4 + 32 / (adapter.attention.num_kv_heads * adapter.head_dim // 4))):
        scheme = get_scheme(scheme)
        method.apply(model, adapter, method.calibrate(_ctx(model, tok, adapter, scheme)), scheme)
        codecs = [view.attn.kv_codecs for view in adapter.layers()]
        acc = kv_accounting(method.policy(scheme), model.config, 256, codecs)
        expect = ((256 - 16) * feature_bits * 0.25 + 16 * 16) / 256
        assert acc["key_bits"] == pytest.approx(expect, abs=1e-4)
        assert acc["value_bits"] > acc["key_bits"]


def test_codec_without_a_format_projects_and_a_policy_without_codec_is_refused():
    basis = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    y = LowRankChannels(basis).quantize(x, None)
    torch.testing.assert_close(LowRankChannels(basis).quantize(y, None), y)  # a projector
    method = get_method("cskv")({})
    with pytest.raises(RuntimeError, match="no key codec"):
        method.policy(get_scheme("w16a16")).quantize("key", x)
    with pytest.raises(InvalidValueError, match="formats only"):
        method.policy(get_scheme("kivi2"))
