"""Normalised Hadamard matrices of the orders rotation papers need (LLM widths such as 576, 1536, 11008).

hadamard(n) = (H_m ⊗ H_{2^k}) / sqrt(n) for n = m · 2^k, with
- H_{2^k}: the Sylvester matrix H_2^{⊗k} (symmetric, H[i, j] = (-1)^popcount(i & j));
- H_m: a ±1 base matrix, m the SMALLEST order n / 2^j that has a construction here:
    Paley I   m = q + 1,      q = 3 mod 4 an odd prime            (12, 20, 44, 60, 68, 84, 108, 140, ...)
    Paley II  m = 2 (q + 1),  q = 1 mod 4 a prime or prime square (28, 36, 52 [q = 25], 76, 100, 124, ...)
    Williamson  m = 156, 172 (tabulated sequences, see williamson.py)
  (40 = 20 · 2 needs no base of its own: H_20 ⊗ H_{2^k} already covers every 40 · 2^k.)
Index convention: row/column i = i_m · 2^k + i_p (the m-part is the slow index), which is what
`hadamard_transform` computes by viewing the last dim as [m, 2^k].
Orders with no such form (e.g. 92 = 4·23, 116 = 4·29, 188 = 4·47, any 2 · odd > 2) raise InvalidValueError
naming the valid forms.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from harness.errors import InvalidValueError
from harness.transforms.paley import paley, paley_kind
from harness.transforms.williamson import WILLIAMSON_ORDERS, williamson

_BASES_IN_MESSAGE = 200  # base orders listed in the error message


def _check_order(n, what: str = "Hadamard order") -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InvalidValueError(what, n, "a positive integer")
    return int(n)


@functools.lru_cache(maxsize=None)
def base_kind(m: int) -> tuple[str, int] | None:
    """How the ±1 base matrix of order m is built: ('sylvester', 2^k), ('paley1', q), ('paley2', q),
    ('williamson', m / 4), or None."""
    if m >= 1 and m & (m - 1) == 0:
        return "sylvester", m
    kind = paley_kind(m)
    if kind is not None:
        return kind
    if m in WILLIAMSON_ORDERS:
        return "williamson", m // 4
    return None


@functools.lru_cache(maxsize=None)
def base_orders(limit: int) -> tuple[int, ...]:
    """Non-power-of-two base orders m <= limit that `decompose` uses (no m / 2^j is itself a base): 12, 20, 28, ..."""
    return tuple(m for m in range(3, limit + 1) if _split(m) == (m, 1))


def _supported_text() -> str:
    bases = ", ".join(map(str, base_orders(_BASES_IN_MESSAGE)))
    return (f"2^k or m*2^k with m a base order ({bases}, ...: m-1 an odd prime = 3 mod 4 [Paley I], "
            f"m/2-1 a prime or prime square = 1 mod 4 [Paley II], or m in {', '.join(map(str, WILLIAMSON_ORDERS))} "
            "[Williamson])")


@functools.lru_cache(maxsize=4096)
def _split(n: int) -> tuple[int, int] | None:
    m = n // (n & -n)  # odd part
    while m <= n:  # m = odd part * 2^j, smallest first
        if base_kind(m) is not None:
            return m, n // m
        m *= 2
    return None


def decompose(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k and m the smallest constructible base order (m = 1 for powers of two)."""
    split = _split(_check_order(n))
    if split is None:
        raise InvalidValueError("Hadamard order", n, _supported_text())
    return split


def is_hadamard_order(n) -> bool:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        return False
    return _split(int(n)) is not None


def supported_hadamard_orders(limit: int) -> list[int]:
    """Every order 1..limit that `hadamard` can build."""
    return [n for n in range(1, int(limit) + 1) if is_hadamard_order(n)]


def hadamard_construction(n: int) -> str:
    """Human-readable recipe, e.g. 'paley1(q=11) x sylvester(128)' for 1536."""
    m, p = decompose(n)
    if m == 1:
        return f"sylvester({p})"
    name, q = base_kind(m)
    base = f"{name}(q={q})" if name.startswith("paley") else f"williamson(n={q})"
    return base if p == 1 else f"{base} x sylvester({p})"


def sylvester(n: int) -> torch.Tensor:
    """±1 Sylvester matrix of order n = 2^k (int8): H_2^{⊗k}, doubling [[H, H], [H, -H]] up to 64 and
    Kronecker products of those beyond (same matrix, since H_{2^a} ⊗ H_{2^b} = H_{2^(a+b)}; much faster)."""
    if n > 64:
        return torch.kron(sylvester(64), sylvester(n // 64))
    h = torch.ones(1, 1, dtype=torch.int8)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def base_matrix(m: int) -> torch.Tensor:
    """Unnormalised ±1 base matrix H_m (int8; shared cached tensor, do not modify)."""
    kind = base_kind(m)
    if kind is None:
        raise InvalidValueError("Hadamard base order", m, _supported_text())
    if kind[0] == "sylvester":
        return sylvester(m)
    return williamson(m) if kind[0] == "williamson" else paley(m)


@functools.lru_cache(maxsize=8)
def _pm1(n: int) -> torch.Tensor:
    """Unnormalised ±1 H_m ⊗ H_{2^k} as int8 (n^2 bytes: 256 MiB at 16384, so only a few are kept)."""
    m, p = decompose(n)
    return sylvester(p) if m == 1 else torch.kron(base_matrix(m), sylvester(p))


def hadamard(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Normalised n x n Hadamard matrix (H Hᵀ = I, entries ±1/sqrt(n)), a fresh tensor.

    Every entry is exactly ±(1/sqrt(n) rounded to `dtype`). See the module docstring for the ordering.
    """
    n = _check_order(n)
    if not dtype.is_floating_point:
        raise InvalidValueError("Hadamard dtype", dtype, "a floating-point dtype")
    out = _pm1(n).to(device=device, dtype=dtype)
    return out.mul_(torch.tensor(1.0 / math.sqrt(n), dtype=torch.float64).to(dtype))
