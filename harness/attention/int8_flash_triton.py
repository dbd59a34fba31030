"""The INT-FlashAttention forward as a Triton kernel (see int8_flash.py for the arithmetic it must match).

One program per (BLOCK_M queries, batch · head); key tiles of BLOCK_N from the first visible one to the
diagonal, in order, as the torch reference walks them. INT8 Q·Kᵀ and P·V dots accumulate in INT32. On a
CPU it runs under the Triton interpreter (TRITON_INTERPRET=1), which the tests use; its speed is measured
on a GPU by benchmarks/bench_int8_flash.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from harness.attention.int8_flash import BLOCK_M, BLOCK_N, LOG2E, quantize_per_head, quantize_per_token


@triton.jit
def _int8_flash_fwd(Q, K, V, QS, KS, VS, Out, qk_scale, T, window, H,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FULL: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    base = bh.to(tl.int64) * T * D  # [B·H, T, D] contiguous
    sbase = bh.to(tl.int64) * T  # [B·H, T]
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < T, other=0)
    qs = tl.load(QS + sbase + offs_m, mask=offs_m < T, other=0.0)
    vs = tl.load(VS + bh) if FULL else 1.0
    m_i = tl.zeros([BM], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BM], dtype=tl.float32) + 1.0
    acc = tl.zeros([BM, D], dtype=tl.float32)
    hi = tl.minimum((start_m + 1) * BM, T)
    lo = tl.maximum(start_m * BM - window + 1, 0) // BN * BN
    for n0 in range(lo, hi, BN):
        kn = n0 + offs_n
        k = tl.load(K + base + kn[None, :] * D + offs_d[:, None], mask=kn[None, :] < T, other=0)  # [D, BN]
        ks = tl.load(KS + sbase + kn, mask=kn < T, other=0.0)
        qk = tl.dot(q, k).to(tl.float32)
        qk = qk * qs[:, None]
        qk = qk * ks[None, :]
        visible = (offs_m[:, None] >= kn[None, :]) & ((offs_m[:, None] - kn[None, :]) < window) & (kn[None, :] < T)
        qk = qk * qk_scale + tl.where(visible, 0.0, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
        p = tl.math.exp2(qk)
        l_ij = tl.sum(p, 1)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + l_ij
        acc = acc * alpha[:, None]
        v = tl.load(V + base + kn[:, None] * D + offs_d[None, :], mask=kn[:, None] < T, other=0)
        if FULL:
            p8 = ((p.to(tl.float16) * 127) + 0.5).to(tl.int8)
            tmp = tl.dot(p8, v).to(tl.float32)
            acc = acc + tmp * vs / 127
        else:
            acc = acc + tl.dot(p.to(tl.float16), v).to(tl.float32)
        m_i = m_ij
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * D + offs_d[None, :], acc, mask=offs_m[:, None] < T)


def int8_flash_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, variant: str = "full",
                      window: int | None = None) -> torch.Tensor:
    """Causal attention [B, H, T, D] (same heads for q, k, v; D a power of two >= 16) in the INT8 arithmetic."""
    b, h, t, d = q.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"int8 flash attention head_dim {d}: a power of two >= 16")
    q8, qs = quantize_per_token(q)
    k8, ks = quantize_per_token(k)
    full = variant == "full"
    if full:
        v8, vs = quantize_per_head(v)
        v_in, vs = v8.to(torch.int8).reshape(b * h, t, d).contiguous(), vs.reshape(b * h).float().contiguous()
    else:
        v_in, vs = v.half().reshape(b * h, t, d).contiguous(), torch.ones(b * h, device=q.device)
    out = torch.empty(b * h, t, d, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, BLOCK_M), b * h)
    _int8_flash_fwd[grid](q8.to(torch.int8).reshape(b * h, t, d).contiguous(), k8.to(torch.int8).reshape(b * h, t, d).contiguous(),
                          v_in, qs.reshape(b * h, t).float().contiguous(), ks.reshape(b * h, t).float().contiguous(), vs,
                          out, sm_scale * LOG2E, t, window if window is not None else t + 1, h,
                          D=d, BM=BLOCK_M, BN=BLOCK_N, FULL=full)
    return out.reshape(b, h, t, d).to(q.dtype)
