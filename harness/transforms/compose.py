"""Structured transforms applied without dense matrices: Kronecker products and block-diagonal rotations.

Convention (whole package): a transform R acts on row vectors along the last dim, x -> x @ R.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from harness.errors import InvalidValueError
from harness.transforms.hadamard import hadamard
from harness.transforms.orthogonal import random_hadamard


def kron_apply(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """x @ (F_1 ⊗ ... ⊗ F_s) along the last dim, one Kronecker axis at a time.

    The last dim (size prod rows(F_i)) is viewed as [r_1, ..., r_s] (r_1 slowest); axis i is contracted
    with F_i, so the cost is sum_i n * cols(F_i) per row instead of n^2. Factors must already be on
    x's device and dtype; they may be rectangular.
    """
    n = math.prod(f.shape[0] for f in factors)
    if x.shape[-1] != n:
        raise InvalidValueError("last dimension for this Kronecker product", x.shape[-1],
                                f"{n} (product of the factors' rows)")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    tail = 1  # product of the output sizes of the axes already done (the fastest ones)
    for f in reversed(factors):
        r = f.shape[0]
        if tail == 1:
            y = y.reshape(-1, r) @ f
        else:  # y viewed as [batch, r, tail]: contract the middle axis, F^T @ y
            y = torch.matmul(f.transpose(0, 1), y.reshape(-1, r, tail))
        tail *= f.shape[1]
    return y.reshape(*lead, tail)


def kronecker(a: torch.Tensor, b: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """Dense A ⊗ B (⊗ ...)."""
    return functools.reduce(torch.kron, more, torch.kron(a, b))


def apply_kronecker(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """x @ (A ⊗ B ⊗ ...) without the dense product: for two factors this is Aᵀ X B on x viewed as
    [..., rows(A), rows(B)] (FlatQuant-style). Output last dim is the product of the factors' columns."""
    factors = [f.to(dtype=x.dtype, device=x.device) for f in (a, b, *more)]
    return kron_apply(x, factors)


def block_diagonal(blocks, num_blocks: int | None = None) -> torch.Tensor:
    """Dense block-diagonal matrix.

    block_diagonal(R, k): I_k ⊗ R (k copies of one square or rectangular block);
    block_diagonal([R_1, R_2, ...]) or block_diagonal(stacked [g, b, b]): diag(R_1, R_2, ...).
    """
    if isinstance(blocks, torch.Tensor) and blocks.dim() == 2:
        k = 1 if num_blocks is None else num_blocks
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidValueError("number of blocks", num_blocks, "a positive integer")
        return torch.kron(torch.eye(k, dtype=blocks.dtype, device=blocks.device), blocks.contiguous())
    if num_blocks is not None:
        raise InvalidValueError("num_blocks with a list of blocks", num_blocks, "None (the list gives the blocks)")
    blocks = list(blocks)
    if not blocks or any(not isinstance(b, torch.Tensor) or b.dim() != 2 for b in blocks):
        raise InvalidValueError("blocks", [getattr(b, "shape", type(b).__name__) for b in blocks],
                                "a 2-D tensor, a [g, b, b] tensor or a non-empty list of 2-D tensors")
    return torch.block_diag(*blocks)


def apply_block_rotation(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x @ block_diagonal(...) along the last dim without the dense matrix.

    rotation [b, b]: the same block on every group of b consecutive channels (x @ (I ⊗ R));
    rotation [g, b, b]: block i on channels i*b .. (i+1)*b - 1 (needs g * b == last dim).
    """
    n = x.shape[-1]
    r = rotation.to(dtype=x.dtype, device=x.device)
    if r.dim() == 2 and r.shape[0] == r.shape[1]:
        b = r.shape[0]
        if n % b:
            raise InvalidValueError(f"last dimension for block rotations of size {b}", n, f"a multiple of {b}")
        return (x.reshape(-1, b) @ r).reshape(x.shape)
    if r.dim() == 3 and r.shape[1] == r.shape[2]:
        g, b = r.shape[0], r.shape[1]
        if n != g * b:
            raise InvalidValueError(f"last dimension for {g} blocks of size {b}", n, f"{g * b}")
        return (x.reshape(-1, g, 1, b) @ r).reshape(x.shape)
    raise InvalidValueError("block rotation shape", tuple(rotation.shape), "[b, b] or [g, b, b]")


def block_hadamard(n: int, block: int, seed: int | None = None, dtype: torch.dtype = torch.float64,
                   device=None) -> torch.Tensor:
    """Dense I_{n/block} ⊗ H_block (H randomised as in `random_hadamard` if `seed` is given).

    block = 32 matches MX formats, 16 NVFP4; n must be a multiple of block.
    """
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(block, bool) or not isinstance(block, int) \
            or block < 1 or n < 1 or n % block:
        raise InvalidValueError(f"size for block rotations of size {block}", n, f"a positive multiple of {block}")
    h = hadamard(block) if seed is None else random_hadamard(block, seed)
    return block_diagonal(h, n // block).to(dtype=dtype, device=device)
