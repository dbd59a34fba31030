"""Statistics accumulators with one API: `add(x)` (rows along the last dim), `n` (rows seen so far).

Each keeps only what its statistic needs (a d x d matrix, a d-vector, a bounded sample), so memory does
not grow with the number of calibration tokens. `StatsTap` is an identity module that feeds one, for a
method that needs a site's input statistics without writing a hook.
"""
from __future__ import annotations

import torch
from torch import nn


class Hessian:
    """Running H = 2/n Σ x xᵀ over the rows of x (on the device of the first batch), GPTQ's input Hessian.

    Accumulated in fp64 (the reference uses fp32): a BLAS splits the token sum differently with other
    thread counts, and in fp32 that moved GPTQ's results between a 2-thread local run and a 1-CPU
    Ray worker; in fp64 the difference stays far below fp32 resolution."""

    def __init__(self, dim: int):
        self.dim = dim
        self.h: torch.Tensor = torch.zeros(dim, dim)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        if self.n == 0:
            self.h = torch.zeros(self.dim, self.dim, device=x.device, dtype=torch.float64)
        self.h *= self.n / (self.n + m)  # keep H an average: 2/n Σ x xᵀ with n growing
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.h += x.T @ x


class InputDrift:
    """Running D = 2/n Σ (x - x̃) x̃ᵀ over paired rows: x the full-precision model's input of a linear, x̃ the
    input the partially quantized model gives it (GPTAQ's dXXᵀ, on the same 2/n scale as `Hessian`, fp64)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.d: torch.Tensor = torch.zeros(dim, dim, dtype=torch.float64)
        self.n = 0

    def add(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        x_fp = x_fp.detach().reshape(-1, x_fp.shape[-1]).to(torch.float64)
        x_q = x_q.detach().reshape(-1, x_q.shape[-1]).to(torch.float64)
        if x_fp.shape != x_q.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(x_fp.shape)} vs {tuple(x_q.shape)}")
        m = x_q.shape[0]
        if m == 0:
            return
        if self.n == 0:
            self.d = torch.zeros(self.dim, self.dim, device=x_q.device, dtype=torch.float64)
        self.d *= self.n / (self.n + m)
        self.n += m
        self.d += (x_fp - x_q).T @ x_q * (2 / self.n)


class SecondMoment:
    """Σ = E[x xᵀ] over rows, summed in fp64 on the CPU (the covariance of uncentred inputs)."""

    def __init__(self, dim: int):
        self.sum = torch.zeros(dim, dim, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum += x.T @ x
        self.n += x.shape[0]

    @property
    def cov(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


class RowSample:
    """A seeded sample of at most `keep` rows: each batch contributes up to keep/64 random rows, and
    `sample()` draws `keep` of those (so every batch is represented, whatever the batch count)."""

    def __init__(self, keep: int, seed: int):
        self.keep, self.rows = keep, []
        self.n = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        take = min(x.shape[0], max(1, self.keep // 64))
        self.rows.append(x[torch.randperm(x.shape[0], generator=self.generator)[:take]])

    def sample(self) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.randperm(rows.shape[0], generator=self.generator)[: self.keep]]


class ChannelStats:
    """Running per-channel max|x| and mean|x| over the rows seen (kept on the CPU)."""

    def __init__(self):
        self.absmax: torch.Tensor | None = None
        self.abssum: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        a = x.abs().float()
        m, s = a.amax(0).cpu(), a.sum(0, dtype=torch.float64).cpu()
        if self.absmax is None:
            self.absmax, self.abssum = m, s
        else:
            self.absmax, self.abssum = torch.maximum(self.absmax, m), self.abssum + s
        self.n += x.shape[0]

    @property
    def absmean(self) -> torch.Tensor | None:
        return None if self.abssum is None else (self.abssum / max(self.n, 1)).float()


class AbsMax:
    """Running per-channel max|x| in fp32 on the device of the inputs."""

    def __init__(self):
        self.amax: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)
        self.n += x.numel() // x.shape[-1]


class StatsTap(nn.Module):
    """Identity that feeds its input to an accumulator (install it where an input transform goes)."""

    def __init__(self, stats):
        super().__init__()
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.add(x)
        return x
