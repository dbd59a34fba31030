"""Put the model's own module classes back where the harness replaced them, so a checkpoint loads anywhere.

Today one: Gemma's RMSNorm, which the Gemma-3 adapter holds as `UnitOffsetRMSNorm` (weight 1 + w) so that
methods can fold scales into it. Exported, it is the model's own `...RMSNorm` with weight w' = stored - 1.
That gives the stored gain back exactly (fl(1 + w') = stored) unless a method folded a small scale into it
(a gain below 1/2 loses low bits in stored - 1): then the export is inexact and refused unless allowed.

(This belongs with the adapters; it lives here because every line of harness.models is hashed into the
run ids, and moving it there is left for the next change that regenerates the records anyway.)
"""
from __future__ import annotations

import sys

import torch

from harness.errors import PtqbenchError


def _native_rmsnorm(model: torch.nn.Module) -> type:
    module = sys.modules[type(model).__module__]
    found = [cls for name, cls in vars(module).items() if name.endswith("RMSNorm") and isinstance(cls, type)]
    if not found:
        raise PtqbenchError(f"no RMSNorm class in {module.__name__} to restore the unit-offset norms with")
    return found[0]


def restore_native_modules(model: torch.nn.Module, allow_inexact: bool = False) -> tuple[set[str], float]:
    """Swap harness stand-ins for the model's own classes in place; returns the names swapped and the
    largest relative change of a gain it caused (0.0: exact)."""
    from harness.models.adapters.dense import UnitOffsetRMSNorm

    swapped, worst = set(), 0.0
    for name, module in list(model.named_modules()):
        if not isinstance(module, UnitOffsetRMSNorm):
            continue
        cls = _native_rmsnorm(model)
        native = cls(module.weight.shape[0], eps=module.eps).to(module.weight.device)
        stored = module.weight.detach()
        offset = (stored.float() - 1.0).to(stored.dtype)
        restored = (1.0 + offset.float()).to(stored.dtype)
        if not torch.equal(restored, stored):
            change = ((restored.float() - stored.float()).abs() / stored.float().abs().clamp_min(1e-30)).max().item()
            if not allow_inexact:
                raise PtqbenchError(f"{name}: the folded gain is not exactly 1 + w in the model's own norm (relative "
                                    f"change up to {change:.2g}); pass --allow-inexact to export it rounded")
            worst = max(worst, change)
        with torch.no_grad():
            native.weight.copy_(offset)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, native)
        swapped.add(name)
    return swapped, worst
