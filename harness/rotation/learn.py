"""Learning orthogonal matrices: Cayley SGD on the Stiefel manifold and the QR-Orth parameterisation.

Two ways to keep a trained matrix orthogonal, used by the learned-rotation methods:

* `CayleySGD` (SpinQuant's optimiser, from Li, Li & Todorovic, ICLR 2020): the parameter IS the
  orthogonal matrix X. Each step builds the skew-symmetric generator W = ½(V Xᵀ − X Vᵀ) from the descent
  direction V (−gradient, plus momentum) and moves along the Cayley curve
  X ← (I − α/2 W)⁻¹ (I + α/2 W) X, which is orthogonal for any α (computed exactly, in float64, by a
  linear solve rather than the paper's fixed-point iterations). Step size α = min(lr, 1 / ‖XᵀWX‖₁), as in
  SpinQuant's SGDG (which updates Xᵀ, whose generator is −XᵀWX), so a large lr (the paper uses 1.5)
  cannot overshoot.
* `qr_orth` (DartQuant): an unconstrained latent Z is trained by any Euclidean optimiser and the
  rotation is R = Q of Z = QR, with signs fixed so that diag(R) > 0 (the unique QR; for an orthogonal
  Z it returns Z itself, so initialising Z with a Hadamard starts exactly at that Hadamard).

Plus a cosine learning-rate schedule both use. (Straight-through quantizers: harness.quant.straight_through;
the memory meter: harness.calib.MemoryMeter.)
"""
from __future__ import annotations

import math

import torch

from harness.errors import InvalidValueError


def qr_orth(z: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q of Z = Q R with diag(R) >= 0 (batched over leading dims); differentiable in Z."""
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    signs = torch.where(d < 0, -1.0, 1.0).to(q.dtype)
    return q * signs.unsqueeze(-2)  # scale column j by sign(R_jj)


def orthogonality_error(x: torch.Tensor) -> float:
    """max |Xᵀ X − I| (batched)."""
    x64 = x.detach().to(torch.float64)
    eye = torch.eye(x64.shape[-1], dtype=torch.float64, device=x64.device)
    return float((x64.transpose(-2, -1) @ x64 - eye).abs().max())


class CayleySGD(torch.optim.Optimizer):
    """SGD (optional momentum) on square orthogonal matrices, via the Cayley transform.

    Parameters must be square [n, n] (or batched [..., n, n]) orthogonal matrices; they stay orthogonal
    to float64 rounding (~1e-12 per step) whatever the step. Keep them in float64 for long runs.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, max_step: float = 1.0):
        if lr <= 0:
            raise InvalidValueError("CayleySGD lr", lr, "> 0")
        if not 0 <= momentum < 1:
            raise InvalidValueError("CayleySGD momentum", momentum, "0 <= momentum < 1")
        super().__init__(params, dict(lr=lr, momentum=momentum, max_step=max_step))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                x = p.data.to(torch.float64)
                if x.shape[-1] != x.shape[-2]:
                    raise InvalidValueError("CayleySGD parameter shape", tuple(x.shape), "square [..., n, n]")
                direction = -p.grad.to(torch.float64)
                state = self.state[p]
                if group["momentum"] and "momentum" in state:
                    direction = direction + group["momentum"] * state["momentum"]
                xt = x.transpose(-2, -1)
                w = 0.5 * (direction @ xt - x @ direction.transpose(-2, -1))  # skew-symmetric generator
                # step cap of SpinQuant's SGDG: alpha * ||W'||_1 <= max_step (max column abs sum), where
                # W' = -Xᵀ W X is the generator in SGDG's frame (it updates Xᵀ); the 1-norm is not invariant
                # under that similarity, so the cap is taken on the quantity SGDG itself bounds
                norm1 = (xt @ w @ x).abs().sum(dim=-2).amax()
                alpha = min(group["lr"], group["max_step"] / (float(norm1) + 1e-8))
                eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
                half = 0.5 * alpha * w
                new = torch.linalg.solve(eye - half, (eye + half) @ x)
                if group["momentum"]:
                    state["momentum"] = w @ x  # the tangent direction taken, carried to the next step
                p.data.copy_(new.to(p.dtype))
        return loss


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from `base` at step 0 towards 0 at `total` (no warm-up), as HF's "cosine" schedule."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
