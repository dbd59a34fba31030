from __future__ import annotations

import torch

from harness.rotation.blockstats import (
    balancing_permutation,
    block_energies,
    choose_intra_block,
    coefficient_of_variation,
    e2m1_code_entropy,
    equalize_blocks,
    intra_block_candidates,
    pooled_block_covariance,
)


def sylvester(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / k**0.5


def outlier_activations(n=512, d=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d, dtype=torch.float64)
    scale[torch.randperm(d, generator=g)[:6]] = 30.0  # a few outlier channels, LLM-style
    mix = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix * scale


def test_balancing_permutation_is_a_permutation_and_reduces_imbalance():
    x = outlier_activations()
    energies = x.pow(2).mean(0)
    perm = balancing_permutation(energies, 32)
    assert sorted(perm.tolist()) == list(range(128))
    before = coefficient_of_variation(energies.reshape(-1, 32).sum(-1))
    after = coefficient_of_variation(energies[perm].reshape(-1, 32).sum(-1))
    assert after < before


def test_equalize_blocks_orthogonal_and_exact_with_correlations():
    x = outlier_activations()
    cov = x.T @ x / x.shape[0]
    q = equalize_blocks(cov, 32)
    torch.testing.assert_close(q.T @ q, torch.eye(128, dtype=torch.float64), atol=1e-10, rtol=0)
    energies = block_energies(q.T @ cov @ q, 32)
    assert coefficient_of_variation(energies) < 1e-9
    assert coefficient_of_variation(block_energies(cov, 32)) > 0.3
    # measured on the data too (Σ is the data's second moment, so this is the same statement)
    rotated = x @ q
    assert coefficient_of_variation(rotated.pow(2).mean(0).reshape(-1, 32).sum(-1)) < 1e-9


def test_code_entropy_rises_when_heavy_tails_are_gaussianised():
    g = torch.Generator().manual_seed(3)
    heavy = torch.randn(256, 128, generator=g) ** 3  # heavy-tailed
    h = sylvester(32)
    rotated = (heavy.double().reshape(256, 4, 32) @ h).reshape(256, 128)
    assert e2m1_code_entropy(rotated) > e2m1_code_entropy(heavy) + 0.3
    assert 0 < e2m1_code_entropy(heavy) < 3.91


def test_choose_intra_block_prefers_a_rotation_for_heavy_tails():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 128, generator=g, dtype=torch.float64) ** 3
    cands = intra_block_candidates(pooled_block_covariance(x.T @ x / 256, 32), sylvester(32), seeds=2)
    for r in cands.values():
        torch.testing.assert_close(r.T @ r, torch.eye(32, dtype=torch.float64), atol=1e-10, rtol=0)
    best, entropies = choose_intra_block(x, cands, 32)
    assert best != "identity" and entropies[best] == max(entropies.values())


def test_two_level_applies_its_dense_matrix_and_inverts_without_forming_it():
    from harness.rotation.blockstats import TwoLevel

    g = torch.Generator().manual_seed(0)
    r = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]
    x = torch.randn(5, 32, generator=g, dtype=torch.float64)
    for inter in (torch.randperm(32, generator=g), torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]):
        t = TwoLevel(inter, r)
        dense = t.dense()
        torch.testing.assert_close(dense @ dense.T, torch.eye(32, dtype=torch.float64))
        torch.testing.assert_close(t.apply(x), x @ dense)
        torch.testing.assert_close(t.apply_transpose(t.apply(x)), x)
    assert TwoLevel(torch.arange(32), r).is_permutation and not t.is_permutation
