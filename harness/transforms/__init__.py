"""Rotations and transforms: Hadamard matrices of many orders, FWHT, random orthogonal, block and Kronecker.

Convention: every transform R acts on row vectors along the last dim, x -> x @ R.
"""
from harness.transforms.compose import (
    apply_block_rotation,
    apply_kronecker,
    block_diagonal,
    block_hadamard,
    kronecker,
)
from harness.transforms.fwht import fwht, hadamard_transform
from harness.transforms.hadamard import (
    base_orders,
    decompose,
    hadamard,
    hadamard_construction,
    is_hadamard_order,
    supported_hadamard_orders,
)
from harness.transforms.orthogonal import random_hadamard, random_orthogonal, random_signs

__all__ = [
    "apply_block_rotation", "apply_kronecker", "base_orders", "block_diagonal", "block_hadamard", "decompose", "fwht",
    "hadamard", "hadamard_construction", "hadamard_transform", "is_hadamard_order", "kronecker", "random_hadamard",
    "random_orthogonal", "random_signs", "supported_hadamard_orders",
]
