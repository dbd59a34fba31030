"""Put the model's own module classes back where the harness replaced them, so a checkpoint loads anywhere.

Today one: Gemma's RMSNorm, which the Gemma-3 adapter holds as `UnitOffsetRMSNorm` (weight 1 + w) so that
methods can fold scales into it. Exported, it is the model's own `...RMSNorm` with weight w' = stored - 1,
checked to give back the stored gain exactly (fl(1 + w') = stored), else refused.

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


def restore_native_modules(model: torch.nn.Module, adapter) -> set[str]:
    """Swap harness stand-ins for the model's own classes in place; returns the names swapped."""
    from harness.models.adapters.dense import UnitOffsetRMSNorm

    swapped = set()
    for name, module in list(model.named_modules()):
        if not isinstance(module, UnitOffsetRMSNorm):
            continue
        cls = _native_rmsnorm(model)
        native = cls(module.weight.shape[0], eps=module.eps).to(module.weight.device)
        stored = module.weight.detach()
        offset = (stored.float() - 1.0).to(stored.dtype)
        if not torch.equal((1.0 + offset.float()).to(stored.dtype), stored):
            raise PtqbenchError(f"{name}: its gain 1 + w is not exactly representable as the model's own norm weight")
        with torch.no_grad():
            native.weight.copy_(offset)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, native)
        swapped.add(name)
    return swapped
