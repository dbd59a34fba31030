"""RoPE as transformers applies it to keys (the rotate-half convention of Llama, Qwen, Gemma, Mistral):
k' = k·cos + rotate_half(k)·sin, so k = k'·cos − rotate_half(k')·sin undoes it exactly in real numbers
(in floats to an ulp). Pre-RoPE key quantization (SKVQ, KIVI) undoes RoPE, quantizes, and rotates back."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, tokens, head_dim]; cos / sin [batch, tokens, head_dim] as the rotary module gives them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def unrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos - rotate_half(x) * sin
