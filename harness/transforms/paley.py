"""Paley constructions of ±1 Hadamard matrices from the quadratic character of a finite field GF(q).

- Paley I  (q = 3 mod 4): order q + 1.
- Paley II (q = 1 mod 4): order 2 (q + 1).
q may be an odd prime p or a prime square p^2 (GF(p^2) = GF(p)[a]/(a^2 - r), r a non-residue mod p).
Paley I never needs p^2 (an odd square is 1 mod 4), so prime squares only enter through Paley II (52 = 2 (25 + 1)).
"""
from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=None)
def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def field_supported(q: int) -> bool:
    """GF(q) for odd q = p or p^2: the fields this module can do arithmetic in."""
    pk = prime_power(q)
    return pk is not None and pk[0] > 2 and pk[1] <= 2


def quadratic_character_matrix(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[a, b] = chi(b - a) over GF(q), chi the quadratic character (0 at 0).

    Field elements are indexed as x0 + p * x1 for x0 + x1 * alpha (x1 = 0 for a prime field).
    """
    p, k = prime_power(q)
    idx = torch.arange(q)
    x0, x1 = idx % p, idx // p
    # chi as a table over element indices: +1 on the nonzero squares, -1 on the other nonzero elements
    if k == 1:
        sq = (x0 * x0) % p
    else:
        residues = {(x * x) % p for x in range(1, p)}
        r = next(x for x in range(2, p) if x not in residues)  # alpha^2 = r, a non-residue
        sq = (x0 * x0 + r * x1 * x1) % p + p * ((2 * x0 * x1) % p)  # (x0 + x1 alpha)^2
    chi = torch.full((q,), -1, dtype=torch.int8)
    chi[sq[1:]] = 1
    chi[0] = 0
    d0 = (x0[None, :] - x0[:, None]) % p
    d1 = (x1[None, :] - x1[:, None]) % p
    return chi[d0 + p * d1]


def paley_kind(order: int) -> tuple[str, int] | None:
    """('paley1', q) or ('paley2', q) if `order` has a Paley construction here (Paley I preferred)."""
    q = order - 1
    if q % 4 == 3 and field_supported(q):
        return "paley1", q
    if order % 4 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and field_supported(q):
            return "paley2", q
    return None


def paley(order: int) -> torch.Tensor:
    """±1 Hadamard matrix (int8) of `order` by Paley I or II; ValueError if neither applies."""
    kind = paley_kind(order)
    if kind is None:
        raise ValueError(f"no Paley construction of order {order}")
    name, q = kind
    jac = quadratic_character_matrix(q)
    if name == "paley1":
        # Skew core [[0, 1], [-1, Q]] (Q is skew for q = 3 mod 4) plus I.
        c = torch.zeros(order, order, dtype=torch.int8)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, -1, jac
        return c + torch.eye(order, dtype=torch.int8)
    # Symmetric conference matrix C = [[0, 1], [1, Q]]; H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]].
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jac
    plus = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    minus = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.int8), minus)
