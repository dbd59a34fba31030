"""One memory meter for every phase (a cell's calibration, a method's rotation fit): nestable.

CPU: peak resident set size, sampled by a thread (psutil) every 50 ms (a sampler waking more often
competes for the GIL with Python-heavy loops such as GPTQ's column loop). CUDA: peak allocated bytes. CUDA keeps one
process-wide peak counter, so a meter that resets it would spoil the peak of a meter around it; here
every reset first folds the current peak into each open meter, so every meter's peak stays exact.
"""
from __future__ import annotations

import threading

import torch

_OPEN: list["MemoryMeter"] = []  # meters inside their `with` block, outermost first (CUDA bookkeeping)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@torch.no_grad()
def page_in(model: torch.nn.Module) -> None:
    """Read every parameter once. Weights memory-mapped from a file (safetensors loading) join the
    resident set only when first read; doing it before a meter keeps that out of the peak."""
    for p in model.parameters():
        if p.device.type == "cpu":
            p.detach().sum()


class MemoryMeter:
    """Peak memory while the block runs.

    `peak_rss` / `start_rss`: the process's resident set (bytes); `peak_cuda` / `start_cuda`: CUDA
    allocated bytes (0 without CUDA). `extra_bytes`: what the block added on top of where it started,
    on the CUDA device when `device` is one, else in host memory."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.05):
        self.on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.cuda = torch.cuda.is_available()
        self.interval = interval
        self.start_rss = self.peak_rss = 0
        self.start_cuda = self.peak_cuda = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, _rss())
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> MemoryMeter:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            for outer in _OPEN:  # their peak so far survives the reset below
                outer.peak_cuda = max(outer.peak_cuda, peak)
            self.start_cuda = self.peak_cuda = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        _OPEN.append(self)
        self.start_rss = self.peak_rss = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, _rss())
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_cuda = max(self.peak_cuda, torch.cuda.max_memory_allocated())
        _OPEN.remove(self)

    @property
    def extra_bytes(self) -> int:
        if self.on_cuda:
            return int(self.peak_cuda - self.start_cuda)
        return int(max(self.peak_rss - self.start_rss, 0))

    @property
    def kind(self) -> str:
        return "cuda_allocated" if self.on_cuda else "cpu_rss"

    def metrics(self, prefix: str) -> dict[str, float]:
        """`<prefix>_peak_mb` (process RSS), `<prefix>_extra_mb` (RSS added), `<prefix>_peak_gpu_mb`."""
        out = {f"{prefix}_peak_mb": round(self.peak_rss / 2**20, 1),
               f"{prefix}_extra_mb": round(max(self.peak_rss - self.start_rss, 0) / 2**20, 1)}
        if self.cuda:
            out[f"{prefix}_peak_gpu_mb"] = round(self.peak_cuda / 2**20, 1)
        return out
