"""Fast Walsh–Hadamard transforms along the last dim, equal to x @ hadamard(n) without the dense matrix.

fwht (n = 2^k) is a mixed-radix butterfly: H_{2^k} = H_{r_1} ⊗ ... ⊗ H_{r_s} (Sylvester matrices of radix
r_i <= 64), so each stage contracts one axis of x viewed as [r_1, ..., r_s] with a small ±1 matrix. That is
O(n log n) work per row like the radix-2 butterfly, but as ceil(k / 6) matmul passes over memory instead of
k elementwise ones (radix 2 in torch is memory-bound: 12 full passes for n = 4096).
hadamard_transform (n = m · 2^k) adds one more stage with the m x m base matrix on the slow axis
(x viewed as [m, 2^k], matching hadamard(n) = H_m ⊗ H_{2^k} / sqrt(n)).
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from harness.errors import InvalidValueError
from harness.transforms.compose import kron_apply
from harness.transforms.hadamard import base_matrix, decompose, sylvester

MAX_RADIX_BITS = 6  # radix-64 stages: fastest on CPU in our measurements, and still tiny matrices


@functools.lru_cache(maxsize=256)
def _factor(kind: str, size: int, dtype: torch.dtype, device: torch.device, scale: float) -> torch.Tensor:
    """Cached scale · (Sylvester or base) matrix on the target device/dtype (shared: do not modify)."""
    pm = sylvester(size) if kind == "sylvester" else base_matrix(size)
    return (pm.to(torch.float64) * scale).to(dtype=dtype, device=device)


def _radix_sizes(n: int) -> list[int]:
    k = n.bit_length() - 1
    stages = -(-k // MAX_RADIX_BITS)
    return [1 << (k // stages + (i < k % stages)) for i in range(stages)]


def _check_float(x: torch.Tensor) -> None:
    if not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise InvalidValueError("transform input dtype", x.dtype, "a floating-point dtype")


_EXACT_SCALE_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _factors(n: int, dtype, device, normalize: bool) -> tuple[list[torch.Tensor], float]:
    """Kronecker factors of H_m ⊗ H_{2^k}, and a scale left to apply to the result.

    Each factor is ±2^-e (e = floor(log2(r) / 2)): exact in every float dtype and keeping magnitudes
    bounded stage to stage. The rest of 1/sqrt(n) is folded into the first factor for fp32/fp64; for 16-bit
    dtypes it is returned instead and applied to the result (a rounded factor entry there would scale the
    whole output by up to 2^-9, the same for every element).
    """
    m, p = decompose(n)
    sizes = ([("base", m)] if m > 1 else []) + [("sylvester", r) for r in (_radix_sizes(p) if p > 1 else [])]
    if not normalize:
        return [_factor(kind, r, dtype, device, 1.0) for kind, r in sizes], 1.0
    exps = [(r.bit_length() - 1) // 2 for _, r in sizes]
    rest = 2.0 ** sum(exps) / math.sqrt(n)  # 1 when n is a power of 4
    fold = dtype in _EXACT_SCALE_DTYPES
    factors = [_factor(kind, r, dtype, device, 2.0 ** -e * (rest if fold and i == 0 else 1.0))
               for i, ((kind, r), e) in enumerate(zip(sizes, exps))]
    return factors, 1.0 if fold else rest


def fwht(x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh–Hadamard transform along the last dim (size 2^k): x @ hadamard(n) if normalize,
    else x @ (±1 Sylvester matrix). Returns a new tensor; x is not modified."""
    _check_float(x)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise InvalidValueError("FWHT size (last dimension)", n, "a power of two (use hadamard_transform for m*2^k)")
    if n == 1:
        return x.clone()
    factors, rest = _factors(n, x.dtype, x.device, normalize)
    y = kron_apply(x, factors)
    return y if rest == 1.0 else y.mul_(rest)


def hadamard_transform(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ hadamard(n) along the last dim for any supported order n (default: the whole last dim).

    With n smaller than the last dim d (n must divide d), every group of n consecutive channels is
    transformed on its own, i.e. x @ (I_{d/n} ⊗ hadamard(n)) — a block Hadamard.
    """
    _check_float(x)
    d = x.shape[-1]
    n = d if n is None else n
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 or d % n:
        raise InvalidValueError(f"Hadamard transform size for last dimension {d}", n, f"a divisor of {d}")
    if n == 1:
        return x.clone()
    factors, rest = _factors(n, x.dtype, x.device, True)
    y = kron_apply(x.reshape(*x.shape[:-1], d // n, n), factors).reshape(x.shape)
    return y if rest == 1.0 else y.mul_(rest)
