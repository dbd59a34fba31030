"""INT-FlashAttention (Chen et al., arXiv 2409.16997; INT-FlashAttention2024/INT-FlashAttention): the arithmetic.

FlashAttention-2's forward with INT8 operands, as `flash_atten_full_int8.py` computes it:
- Q and K quantized per token and head (symmetric, scale = max|row| / 127, round half to even), V per
  (batch, head) over all its tokens and channels (the reference's "pertensor" V scale);
- per key tile: S = (Q8 K8ᵀ) · q_scale · k_scale (an exact integer dot, then fp32), the online softmax in
  fp32 with exp2 (sm_scale · log2 e folded in), running max m and sum l (l from the unquantized P);
- "full": P ∈ [0, 1] is cast to fp16, times 127, plus 0.5, truncated to INT8 (round half up, fixed scale
  1/127); O += (P8 V8) · v_scale / 127, rescaled by exp2(m_old − m_new) as FA2; "half": P and V in fp16;
- O / l at the end.
Because P is quantized relative to the *running* max, the tile sizes are part of the arithmetic: both the
torch reference here and the Triton kernel (int8_flash_triton.py) use BLOCK_M × BLOCK_N tiles in the same
order, so they agree to one INT8 rounding of P (exp2 may differ by an ulp between the two).

Masks: causal, optionally a sliding window (Gemma-3's local layers); nothing else (padding is refused).
Deviations: an all-zero row gets scale 1 instead of the reference's 0 / 0; the output keeps the input's
dtype (the reference stores fp16); the V scale spans the evaluated window, so on a perplexity window it
sees that window's later tokens as a prefill kernel does.
"""
from __future__ import annotations

import torch

from harness.errors import InvalidValueError

VARIANTS = ("full", "half")
BLOCK_M, BLOCK_N = 64, 32
LOG2E = 1.44269504
_MASKED = -1.0e6  # the reference's additive mask


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] -> (int8 values as float32, scale [B, H, T])."""
    amax = x.float().abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x.float() / scale[..., None]), scale


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] -> (int8 values as float32, scale [B, H]) over all tokens and channels of a head."""
    amax = x.float().abs().amax((-2, -1))
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x.float() / scale[..., None, None]), scale


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, t: int, window: int | None) -> torch.Tensor:
    vis = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < t)
    if window is not None:
        vis &= (q_pos[:, None] - k_pos[None, :]) < window
    return vis


def int8_flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, variant: str = "full",
                         window: int | None = None) -> torch.Tensor:
    """Causal attention of q, k, v [B, H, T, D] (same heads) in the INT-FlashAttention arithmetic; [B, H, T, D]."""
    if variant not in VARIANTS:
        raise InvalidValueError("int8 flash attention variant", variant, ", ".join(VARIANTS))
    b, h, t, d = q.shape
    q8, qs = quantize_per_token(q)
    k8, ks = quantize_per_token(k)
    if variant == "full":
        v8, vs = quantize_per_head(v)
    qk_scale = sm_scale * LOG2E
    out = torch.empty(b, h, t, d, dtype=torch.float32, device=q.device)
    for m0 in range(0, t, BLOCK_M):
        q_pos = torch.arange(m0, m0 + BLOCK_M, device=q.device)
        qb, qsb = q8[..., m0:m0 + BLOCK_M, :], qs[..., m0:m0 + BLOCK_M]
        rows = qb.shape[-2]
        m_i = torch.full((b, h, rows), float("-inf"), device=q.device)
        l_i = torch.ones(b, h, rows, device=q.device)
        acc = torch.zeros(b, h, rows, d, device=q.device)
        hi = min(m0 + BLOCK_M, t)
        lo = 0 if window is None else max(0, m0 - window + 1) // BLOCK_N * BLOCK_N
        for n0 in range(lo, hi, BLOCK_N):
            k_pos = torch.arange(n0, n0 + BLOCK_N, device=q.device)
            kb, ksb = k8[..., n0:n0 + BLOCK_N, :], ks[..., n0:n0 + BLOCK_N]
            cols = kb.shape[-2]
            qk = qb @ kb.transpose(-1, -2)  # integers below 2^24: exact in fp32
            qk = qk * qsb[..., None]
            qk = qk * ksb[..., None, :]
            vis = visible_keys(q_pos[:rows], k_pos[:cols], t, window)
            qk = qk * qk_scale + torch.where(vis, 0.0, _MASKED)
            m_ij = torch.maximum(m_i, qk.amax(-1))
            p = torch.exp2(qk - m_ij[..., None])
            l_ij = p.sum(-1)
            alpha = torch.exp2(m_i - m_ij)
            l_i = l_i * alpha + l_ij
            acc = acc * alpha[..., None]
            if variant == "full":
                p8 = ((p.half() * 127) + 0.5).to(torch.int8).float()  # fp16 arithmetic, truncation: round half up
                tmp = p8 @ v8[..., n0:n0 + BLOCK_N, :]
                acc = acc + tmp * vs[..., None, None] / 127
            else:
                acc = acc + p.half().float() @ v[..., n0:n0 + BLOCK_N, :].half().float()
            m_i = m_ij
        out[..., m0:m0 + rows, :] = acc / l_i[..., None]
    return out.to(q.dtype)
