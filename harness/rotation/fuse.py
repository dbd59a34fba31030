"""Weight-level primitives of computational invariance (QuaRot, SpinQuant, BRQ, TORQ, ...).

Conventions: activations are row vectors, a linear computes y = x Wᵀ + b with W of shape [out, in],
and a rotation Q is an orthogonal [d, d] matrix applied as x -> x Q.

- A linear that READS a rotated stream x Q keeps its output if W <- W Q        (`rotate_input`)
- A linear that WRITES into a stream that gets rotated gives y Q if W <- Qᵀ W, b <- b Q (`rotate_output`)
- RMSNorm commutes with orthogonal maps once its scale γ is folded into the linears it feeds
  (W <- W diag(γ), γ <- 1): `fold_norm`.

All arithmetic is done in float64 and cast back, so fused models stay equal to the original to fp32
rounding (the equivalence self-check relies on that).
"""
from __future__ import annotations

import torch


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


@torch.no_grad()
def rotate_input(weight: torch.Tensor, q: torch.Tensor) -> None:
    """In place: W <- W Q along the input dim (last dim; works for [out, in] and fused [E, out, in])."""
    weight.copy_((_as64(weight) @ _as64(q).to(weight.device)).to(weight.dtype))


@torch.no_grad()
def rotate_output(weight: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """In place: W <- Qᵀ W along the output dim (dim -2), b <- b Q."""
    q64 = _as64(q).to(weight.device)
    weight.copy_((q64.T @ _as64(weight)).to(weight.dtype))
    if bias is not None:
        bias.copy_((_as64(bias) @ q64).to(bias.dtype))


@torch.no_grad()
def rotate_embedding(weight: torch.Tensor, q: torch.Tensor) -> None:
    """Embedding rows are residual vectors: E <- E Q."""
    rotate_input(weight, q)


@torch.no_grad()
def fold_norm(norm_weight: torch.Tensor, consumers: list[torch.Tensor], norm_bias: torch.Tensor | None = None,
              consumer_biases: list[torch.Tensor | None] | None = None) -> None:
    """Fold a norm's scale (and bias) into the linears it feeds, then set the norm to identity scale."""
    gamma = _as64(norm_weight)
    for i, w in enumerate(consumers):
        w64 = _as64(w)
        if norm_bias is not None and consumer_biases is not None and consumer_biases[i] is not None:
            consumer_biases[i].copy_((_as64(consumer_biases[i]) + w64 @ _as64(norm_bias)).to(w.dtype))
        w.copy_((w64 * gamma.to(w.device)).to(w.dtype))
    norm_weight.fill_(1.0)
    if norm_bias is not None:
        norm_bias.zero_()


@torch.no_grad()
def rotate_heads_value(weight: torch.Tensor, r: torch.Tensor, head_dim: int, bias: torch.Tensor | None = None) -> None:
    """v_proj output, per head: v_h <- v_h R, i.e. W_h <- Rᵀ W_h (rows of each head block)."""
    out, d_in = weight.shape
    w = _as64(weight).reshape(out // head_dim, head_dim, d_in)
    r64 = _as64(r).to(weight.device)
    weight.copy_(torch.einsum("ji,hjk->hik", r64, w).reshape(out, d_in).to(weight.dtype))
    if bias is not None:
        bias.copy_((_as64(bias).reshape(-1, head_dim) @ r64).reshape(-1).to(bias.dtype))


@torch.no_grad()
def rotate_heads_input(weight: torch.Tensor, r: torch.Tensor, head_dim: int) -> None:
    """o_proj input, per head: columns of each head block W[:, h] <- W[:, h] R."""
    out, d_in = weight.shape
    w = _as64(weight).reshape(out, d_in // head_dim, head_dim)
    weight.copy_((w @ _as64(r).to(weight.device)).reshape(out, d_in).to(weight.dtype))


class OnlineTransform(torch.nn.Module):
    """x -> x Q at run time (e.g. QuaRot's R4 before down_proj), for QuantLinear's input transform.

    `apply_fn` computes x Q without the dense matrix when given (fast Hadamard, block rotation);
    otherwise the dense `matrix` is used. Computation in fp32 for half-precision inputs.
    """

    def __init__(self, matrix: torch.Tensor | None = None, apply_fn=None, name: str = "online"):
        super().__init__()
        if matrix is None and apply_fn is None:
            raise ValueError("OnlineTransform needs a matrix or an apply_fn")
        self.apply_fn = apply_fn
        self.name = name
        self.register_buffer("matrix", None if matrix is None else matrix.to(torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        y = self.apply_fn(x32) if self.apply_fn is not None else x32 @ self.matrix.to(x.device)
        return y.to(dtype)

    def extra_repr(self) -> str:
        return self.name
