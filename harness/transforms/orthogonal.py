"""Seeded random rotations: Haar-random orthogonal matrices and randomised Hadamards.

Convention: a rotation R acts on row vectors, x -> x @ R; for orthogonal R, (x R)(W R)ᵀ = x Wᵀ, which is
how harness.rotation fuses it into weights. Every function draws from its own torch.Generator seeded by
`seed`: the same seed gives the same matrix on every call, and the global RNG is never touched.
"""
from __future__ import annotations

import numbers

import torch

from harness.errors import InvalidValueError
from harness.transforms.hadamard import hadamard


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidValueError("seed", seed, "an integer")
    return torch.Generator().manual_seed(int(seed))


def _check_size(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InvalidValueError("matrix size", n, "a positive integer")
    return int(n)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Haar-random n x n orthogonal matrix: QR of an fp64 Gaussian, with Q's columns multiplied by
    sign(diag(R)) so the distribution is exactly Haar (plain QR is biased by its sign convention)."""
    n = _check_size(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=_generator(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype=dtype, device=device).contiguous()  # QR's Q is column-major


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """n independent fair ±1 signs."""
    n = _check_size(n)
    return torch.where(torch.rand(n, generator=_generator(seed)) < 0.5, -1.0, 1.0).to(dtype=dtype, device=device)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Randomised Hadamard R = diag(s) · H with s = random_signs(n, seed) (signs on the ROWS of H).

    Acting on row vectors, x @ R = (x ⊙ s) @ H: flip input signs, then mix. This is QuaRot's
    `random_hadamard_matrix` (a Hadamard transform applied to diag(s)). The other convention, H · diag(s)
    (mix, then flip output signs), is `hadamard(n) * s` — equally orthogonal, but a different matrix.
    """
    n = _check_size(n)
    return (random_signs(n, seed)[:, None] * hadamard(n)).to(dtype=dtype, device=device)
