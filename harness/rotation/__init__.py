"""Rotation machinery shared by rotation methods: weight fusion primitives and online transforms."""
from harness.rotation.fuse import (
    OnlineTransform,
    fold_norm,
    rotate_embedding,
    rotate_heads_input,
    rotate_heads_value,
    rotate_input,
    rotate_output,
)

__all__ = [
    "OnlineTransform",
    "fold_norm",
    "rotate_embedding",
    "rotate_heads_input",
    "rotate_heads_value",
    "rotate_input",
    "rotate_output",
]
