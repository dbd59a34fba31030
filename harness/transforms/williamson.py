"""Williamson construction of ±1 Hadamard matrices of order 4n (used for 156 = 4·39 and 172 = 4·43).

Four symmetric circulant ±1 matrices A, B, C, D of order n with A² + B² + C² + D² = 4n·I give
    H = [[ A,  B,  C,  D],
         [-B,  A, -D,  C],
         [-C,  D,  A, -B],
         [-D, -C,  B,  A]],   H Hᵀ = 4n·I
(circulants commute and are symmetric here, so every off-diagonal block of H Hᵀ cancels).

The first rows below are published mathematical data, re-checked by tests/unit/test_transforms.py
(symmetry, periodic autocorrelations summing to 4n at shift 0 and to 0 at every other shift).
Taken from the table in SageMath's `williamson_type_quadruples_smallcases`, which attributes
n = 43 to M. Hall Jr., Combinatorial Theory (2nd ed., Wiley) and n = 39 to S. London, "Constructing
new Turyn type sequences, T-sequences and Hadamard matrices" (PhD thesis, UIC, 2013).
"""
from __future__ import annotations

import torch

# '+' = +1, '-' = -1; each string is the first row of one circulant (row i is the first row rolled by i).
WILLIAMSON_FIRST_ROWS: dict[int, tuple[str, str, str, str]] = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++",
         "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++",
         "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+",
         "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+",
         "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}
WILLIAMSON_ORDERS = tuple(sorted(4 * n for n in WILLIAMSON_FIRST_ROWS))


def williamson_sequences(n: int) -> torch.Tensor:
    """The four first rows for circulant order n as a [4, n] int8 tensor of ±1."""
    rows = WILLIAMSON_FIRST_ROWS[n]
    return torch.tensor([[1 if c == "+" else -1 for c in row] for row in rows], dtype=torch.int8)


def circulant(first_row: torch.Tensor) -> torch.Tensor:
    """C[i, j] = first_row[(j - i) mod n]."""
    n = first_row.shape[0]
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return first_row[idx]


def williamson(order: int) -> torch.Tensor:
    """±1 Hadamard matrix (int8) of `order` = 4n from the tabulated Williamson sequences of n."""
    a, b, c, d = (circulant(row) for row in williamson_sequences(order // 4))
    return torch.cat([
        torch.cat([a, b, c, d], 1),
        torch.cat([-b, a, -d, c], 1),
        torch.cat([-c, d, a, -b], 1),
        torch.cat([-d, -c, b, a], 1),
    ], 0)
