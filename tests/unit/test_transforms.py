"""harness.transforms: Hadamard constructions, fast transforms, random rotations, block/Kronecker transforms.

References are computed independently of the fast paths: dense matmuls, explicit loops over blocks,
Jacobsthal properties straight from their definitions, autocorrelations by direct summation.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.errors import InvalidValueError, PtqbenchError
from harness.transforms import (
    apply_block_rotation,
    apply_kronecker,
    base_orders,
    block_diagonal,
    block_hadamard,
    decompose,
    fwht,
    hadamard,
    hadamard_construction,
    hadamard_transform,
    is_hadamard_order,
    kronecker,
    random_hadamard,
    random_orthogonal,
    random_signs,
    supported_hadamard_orders,
)
from harness.transforms.paley import paley_kind, quadratic_character_matrix
from harness.transforms.williamson import WILLIAMSON_FIRST_ROWS, williamson_sequences

# Base orders the rotation papers use (QuaRot/SpinQuant's list, plus 40 = 2 * 20).
PAPER_BASES = [12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172]


def _max_err(a: torch.Tensor, b) -> float:
    return float((a - b).abs().max())


def _assert_hadamard_dense(n: int) -> None:
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert _max_err(h.abs(), 1 / math.sqrt(n)) <= 1e-15, n
    assert _max_err(h @ h.T, torch.eye(n, dtype=torch.float64)) <= 1e-10, n


def _assert_hadamard_probe(n: int) -> None:
    """For orders too big for an O(n^3) Gram matrix, without n x n temporaries: max |h| = 1/sqrt(n) and
    sum h^2 = n (together: every |h| = 1/sqrt(n)), and Hᵀ(H V) = V for random V. With entries ±1/sqrt(n),
    two non-orthogonal rows have an inner product of at least 2/n in magnitude, which the probe would
    show far above its 1e-9 tolerance."""
    h = hadamard(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert abs(float(torch.linalg.vector_norm(h, ord=math.inf)) * math.sqrt(n) - 1) <= 1e-15, n
    assert abs(float(torch.linalg.vector_norm(h)) ** 2 / n - 1) <= 1e-9, n  # fp64 sum of n^2 rounded squares
    v = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert _max_err(h.T @ (h @ v), v) <= 1e-9, n


def _paper_orders(lo: int, hi: int) -> list[int]:
    return sorted({m * 2**k for m in [1, *PAPER_BASES] for k in range(15) if lo < m * 2**k <= hi})


def test_every_supported_order_up_to_256_is_orthogonal_with_entries_pm_1_over_sqrt_n():
    orders = supported_hadamard_orders(256)
    assert {1, 2, 4, 8, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172, 256} <= set(orders)
    for n in orders:
        _assert_hadamard_dense(n)


def test_paper_orders_up_to_2048_some_llm_widths_and_larger_base_orders():
    for n in _paper_orders(256, 2048) + [2304, 2560, 2816, 4096]:
        _assert_hadamard_probe(n)
    bases = [m for m in base_orders(2048) if m > 256]
    for m in bases[::15]:  # a spread of the larger Paley bases (every one: the slow test)
        _assert_hadamard_probe(m)


@pytest.mark.slow
def test_every_supported_order_up_to_1024_every_paper_order_up_to_12000_and_powers_of_two_up_to_16384():
    for n in supported_hadamard_orders(1024):
        _assert_hadamard_dense(n)
    for m in base_orders(4096):
        _assert_hadamard_probe(m)
    for n in _paper_orders(1024, 12000) + [2**k for k in range(11, 15)]:
        _assert_hadamard_probe(n)


def test_orders_rotation_papers_and_llm_widths_need_are_supported_and_decompose_as_documented():
    for n in [576, 768, 896, 1536, 2048, 2304, 2560, 3072, 4864, 5120, 8960, 9728, 11008, 13824, 14336, 17408, 18944]:
        m, p = decompose(n)
        assert m * p == n and p & (p - 1) == 0 and is_hadamard_order(n)
    assert decompose(576) == (36, 16) and decompose(1536) == (12, 128) and decompose(5120) == (20, 256)
    assert decompose(40 * 8) == (20, 16)  # 40 needs no base of its own
    assert decompose(11008) == (172, 64) and decompose(156 * 4) == (156, 4)
    assert hadamard_construction(11008) == "williamson(n=43) x sylvester(64)"
    assert hadamard_construction(52) == "paley2(q=25)" and hadamard_construction(768) == "paley1(q=11) x sylvester(64)"
    assert base_orders(60) == (12, 20, 28, 36, 44, 52, 60)


def test_hadamard_is_the_documented_kronecker_product_and_sylvester_is_popcount_parity():
    for n in (96, 208, 576, 688):
        m, p = decompose(n)
        torch.testing.assert_close(hadamard(n), torch.kron(hadamard(m), hadamard(p)), rtol=1e-15, atol=0)
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(256)] for a in range(256)])
    assert torch.equal(hadamard(256) * 16, (1 - 2 * parity).double())
    assert torch.equal(hadamard(256), hadamard(256).T)


def test_hadamard_returns_fresh_tensors_in_the_requested_dtype_and_device():
    h = hadamard(12, dtype=torch.float32, device="cpu")
    assert h.dtype == torch.float32 and h.device.type == "cpu"
    h.zero_()
    assert hadamard(12, dtype=torch.float32).abs().min() > 0
    assert torch.equal(hadamard(576, torch.bfloat16), hadamard(576).to(torch.bfloat16))
    with pytest.raises(InvalidValueError):
        hadamard(12, dtype=torch.int32)


@pytest.mark.parametrize("q", [3, 7, 9, 11, 13, 19, 25, 49, 59, 121])
def test_jacobsthal_matrix_over_gf_p_and_gf_p2_has_the_paley_properties(q):
    """Q Qᵀ = qI - J, rows sum to 0, Q symmetric for q = 1 mod 4 and skew for q = 3 mod 4."""
    jac = quadratic_character_matrix(q).to(torch.int64)
    ones = torch.ones(q, q, dtype=torch.int64)
    assert torch.equal(jac @ jac.T, q * torch.eye(q, dtype=torch.int64) - ones)
    assert torch.equal(jac.sum(1), torch.zeros(q, dtype=torch.int64))
    assert torch.equal(jac.T, jac if q % 4 == 1 else -jac)
    assert torch.equal(jac.diagonal(), torch.zeros(q, dtype=torch.int64))


def test_paley_kinds_and_williamson_sequences():
    assert paley_kind(12) == ("paley1", 11) and paley_kind(52) == ("paley2", 25) and paley_kind(36) == ("paley2", 17)
    assert paley_kind(156) is None and paley_kind(172) is None and paley_kind(92) is None
    for n in WILLIAMSON_FIRST_ROWS:
        seqs = williamson_sequences(n).tolist()
        assert len(seqs) == 4 and all(len(s) == n and set(s) <= {-1, 1} for s in seqs)
        assert all(s[j] == s[n - j] for s in seqs for j in range(1, n))  # symmetric circulants
        paf = [sum(s[i] * s[(i + shift) % n] for s in seqs for i in range(n)) for shift in range(n)]
        assert paf == [4 * n] + [0] * (n - 1)


def test_fwht_equals_the_dense_product_for_several_sizes_batches_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 8, 64, 128, 1024, 4096):
        for shape in ((n,), (3, n), (2, 3, n)):
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                x = torch.randn(shape, generator=gen, dtype=dtype)
                before = x.clone()
                ref = x.double() @ hadamard(n)
                torch.testing.assert_close(fwht(x).double(), ref, rtol=0, atol=tol * 10)
                torch.testing.assert_close(fwht(x, normalize=False).double(), ref * math.sqrt(n), rtol=0,
                                           atol=tol * 10 * math.sqrt(n))
                assert fwht(x).dtype == dtype and torch.equal(x, before)
    with pytest.raises(InvalidValueError, match="96"):
        fwht(torch.zeros(2, 96))


def test_hadamard_transform_equals_the_dense_product_for_non_powers_of_two():
    gen = torch.Generator().manual_seed(1)
    for n in (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172, 44 * 16, 576, 768, 1536, 2560, 1024):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            x = torch.randn(2, 3, n, generator=gen, dtype=dtype)
            y = hadamard_transform(x)
            assert y.shape == x.shape and y.dtype == dtype
            torch.testing.assert_close(y.double(), x.double() @ hadamard(n), rtol=0, atol=tol * 10)
    # a divisor n of the last dim: every group of n channels on its own (block Hadamard)
    x = torch.randn(5, 96, generator=gen, dtype=torch.float64)
    for n in (12, 32, 48):
        dense = torch.zeros(96, 96, dtype=torch.float64)
        for g in range(96 // n):
            dense[g * n:(g + 1) * n, g * n:(g + 1) * n] = hadamard(n)
        torch.testing.assert_close(hadamard_transform(x, n), x @ dense)
    with pytest.raises(InvalidValueError, match="96"):
        hadamard_transform(x, 40)
    with pytest.raises(InvalidValueError, match="92"):
        hadamard_transform(torch.zeros(2, 92))


def test_hadamard_transform_in_bfloat16_has_no_systematic_scale_error():
    """1/sqrt(n) rounded to bf16 is off by up to 2^-9 (576: +0.2%); the transform must not carry that into
    every output (the online rotation would then disagree with the fp64-fused weights by a constant)."""
    gen = torch.Generator().manual_seed(2)
    for n in (576, 768, 172 * 16, 1024):
        x = torch.randn(256, n, generator=gen).to(torch.bfloat16)
        ref = x.double() @ hadamard(n)
        y = hadamard_transform(x)
        assert y.dtype == torch.bfloat16
        assert abs(float(y.double().norm() / ref.norm()) - 1) < 3e-4, n
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 2e-2, n


def test_random_orthogonal_is_orthogonal_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = random_orthogonal(48, 1), random_orthogonal(48, 1), random_orthogonal(48, 2)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(a @ a.T, torch.eye(48, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert random_orthogonal(48, 1, dtype=torch.float32).dtype == torch.float32
    # Haar: with the sign fix, the first column's first entry is symmetric around 0 across seeds
    firsts = torch.stack([random_orthogonal(4, s)[0, 0] for s in range(400)])
    assert abs(float((firsts > 0).double().mean()) - 0.5) < 0.1


def test_random_hadamard_is_diag_signs_times_hadamard_and_seeded():
    r = random_hadamard(576, 0)
    s = random_signs(576, 0)
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.equal(r, s[:, None] * hadamard(576))  # signs on the rows: x @ R = (x * s) @ H
    torch.testing.assert_close(r @ r.T, torch.eye(576, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.equal(r, random_hadamard(576, 0)) and not torch.equal(r, random_hadamard(576, 1))
    x = torch.randn(3, 576, dtype=torch.float64)
    torch.testing.assert_close(x @ r, hadamard_transform(x * s))


def _dense_block_diag(blocks):
    n = sum(b.shape[0] for b in blocks)
    k = sum(b.shape[1] for b in blocks)
    out = torch.zeros(n, k, dtype=blocks[0].dtype)
    i = j = 0
    for b in blocks:
        out[i:i + b.shape[0], j:j + b.shape[1]] = b
        i, j = i + b.shape[0], j + b.shape[1]
    return out


def test_block_diagonal_and_block_rotations_match_dense():
    r = random_orthogonal(32, 0)
    assert torch.equal(block_diagonal(r, 3), _dense_block_diag([r, r, r]))
    mixed = [random_orthogonal(4, 1), random_orthogonal(8, 2), torch.ones(2, 3, dtype=torch.float64)]
    assert torch.equal(block_diagonal(mixed), _dense_block_diag(mixed))
    stacked = torch.stack([random_orthogonal(16, s) for s in range(6)])
    assert torch.equal(block_diagonal(stacked), _dense_block_diag(list(stacked)))

    x = torch.randn(2, 7, 96, dtype=torch.float64)
    torch.testing.assert_close(apply_block_rotation(x, r), x @ block_diagonal(r, 3))
    torch.testing.assert_close(apply_block_rotation(x, stacked), x @ block_diagonal(stacked))
    torch.testing.assert_close(apply_block_rotation(x.float(), r), (x @ block_diagonal(r, 3)).float(),
                               atol=1e-5, rtol=0)
    with pytest.raises(InvalidValueError, match="96"):
        apply_block_rotation(x, random_orthogonal(40, 0))
    with pytest.raises(InvalidValueError):
        apply_block_rotation(x, stacked[:5])

    for block in (16, 32):
        bh = block_hadamard(128, block)
        assert bh.shape == (128, 128) and torch.count_nonzero(bh) == 128 * block
        assert torch.equal(bh, _dense_block_diag([hadamard(block)] * (128 // block)))
    seeded = block_hadamard(96, 32, seed=3)
    assert torch.equal(seeded, _dense_block_diag([random_hadamard(32, 3)] * 3))
    with pytest.raises(InvalidValueError, match="100"):
        block_hadamard(100, 32)


def test_kronecker_and_apply_kronecker_match_the_definition():
    a, b, c = random_orthogonal(4, 0), random_orthogonal(6, 1), random_orthogonal(3, 2)
    k = kronecker(a, b)
    ref = torch.einsum("ia,jb->ijab", a, b).reshape(24, 24)
    assert torch.equal(k, ref)
    y = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(apply_kronecker(y, a, b), y @ ref)
    z = torch.randn(5, 72, dtype=torch.float64)
    torch.testing.assert_close(apply_kronecker(z, a, b, c), z @ kronecker(a, b, c))
    rect_a, rect_b = torch.randn(4, 2, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(apply_kronecker(y, rect_a, rect_b), y @ kronecker(rect_a, rect_b))
    assert apply_kronecker(y.float(), a, b).dtype == torch.float32
    with pytest.raises(InvalidValueError, match="25"):
        apply_kronecker(torch.zeros(3, 25), a, b)


@pytest.mark.parametrize("n", [3, 6, 7, 92, 116, 188, 2 * 43, 4 * 23 * 2])
def test_orders_without_a_construction_give_a_one_line_error_naming_them_and_the_supported_forms(n):
    assert not is_hadamard_order(n)
    with pytest.raises(InvalidValueError) as err:
        hadamard(n)
    msg = str(err.value)
    assert str(n) in msg and "2^k" in msg and "12, 20" in msg and "156, 172" in msg and "\n" not in msg
    assert isinstance(err.value, PtqbenchError)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "64", True])
def test_non_positive_or_non_integer_orders_are_rejected(bad):
    assert not is_hadamard_order(bad)
    with pytest.raises(InvalidValueError):
        hadamard(bad)


@pytest.mark.gpu
def test_transforms_on_cuda_match_cpu():
    x = torch.randn(64, 11008, dtype=torch.float32)
    y = hadamard_transform(x.cuda()).cpu()
    torch.testing.assert_close(y, hadamard_transform(x), atol=1e-5, rtol=1e-5)
    h = hadamard(1536, dtype=torch.bfloat16, device="cuda")
    assert h.device.type == "cuda" and torch.equal(h.cpu(), hadamard(1536, dtype=torch.bfloat16))
    z = torch.randn(8, 4096, device="cuda")
    torch.testing.assert_close(fwht(z).cpu(), fwht(z.cpu()), atol=1e-5, rtol=1e-5)
