"""The fake quantizer of one site: a format, a straight-through mode, and an optional shared input cache.

Every quantized op (QuantLinear inputs, fused-expert inputs, K/V in attention) calls a `Quantizer`.
Learned methods backpropagate through a quantized model by switching the quantizers of that model to
straight-through (`straight_through(model)`): the forward is the same fake quantization, the backward
the identity. The mode is state of the quantizer objects of that model, nothing global.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from harness.formats import Format, get_format, quantize


def ste_quantize(x: torch.Tensor, fmt, **kwargs) -> torch.Tensor:
    """Fake-quantize in the forward, identity gradient in the backward (straight-through estimator)."""
    q = quantize(x.detach(), fmt, **kwargs)
    return x + (q - x).detach() if x.requires_grad else q


class InputCache:
    """The last input fake-quantized, so readers of one tensor (q/k/v, gate/up) that share this cache
    quantize it once. Keyed on the tensor object (a weak reference: a freed tensor whose memory is reused
    never matches), its version counter (in-place writes invalidate it) and the format; inference only
    (no autograd graph kept alive). Tensors made under torch.inference_mode have no version counter: for
    them the key is the object alone, which holds because readers do not write their input in between."""

    def __init__(self):
        self.ref, self.version, self.fmt, self.out = None, -1, None, None

    def get(self, x: torch.Tensor, fmt: Format) -> torch.Tensor | None:
        version = -1 if x.is_inference() else x._version
        if self.ref is not None and self.ref() is x and self.version == version and self.fmt == fmt:
            return self.out
        return None

    def put(self, x: torch.Tensor, fmt: Format, out: torch.Tensor) -> None:
        self.ref, self.version, self.fmt, self.out = weakref.ref(x), -1 if x.is_inference() else x._version, fmt, out


class Quantizer:
    """x -> fake-quantized x in `fmt` (None: identity); straight-through gradients when `straight_through`."""

    def __init__(self, fmt: Format | str | None = None, straight_through: bool = False,
                 cache: InputCache | None = None):
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.straight_through = straight_through
        self.cache = cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt is None:
            return x
        if self.straight_through:
            return ste_quantize(x, self.fmt)
        if self.cache is None or torch.is_grad_enabled():
            return quantize(x, self.fmt)
        out = self.cache.get(x, self.fmt)
        if out is None:
            out = quantize(x, self.fmt)
            self.cache.put(x, self.fmt, out)
        return out

    def __repr__(self) -> str:
        return f"Quantizer({self.fmt.name if self.fmt else 'fp'}{', ste' if self.straight_through else ''})"


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every Quantizer held by a module of `model` (as an attribute, once each)."""
    out, seen = [], set()
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Quantizer) and id(value) not in seen:
                seen.add(id(value))
                out.append(value)
    return out


def set_straight_through(model: nn.Module, on: bool = True) -> list[Quantizer]:
    """Switch every quantizer of `model` (linears, experts, KV) to straight-through gradients (or back)."""
    found = quantizers(model)
    for q in found:
        q.straight_through = on
    return found


@contextlib.contextmanager
def straight_through(model: nn.Module):
    """Inside the block every quantizer of `model` (linears, experts, KV) has straight-through gradients."""
    found = quantizers(model)
    before = [q.straight_through for q in found]
    set_straight_through(model)
    try:
        yield found
    finally:
        for q, mode in zip(found, before):
            q.straight_through = mode
