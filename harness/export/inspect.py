"""What a quantized model holds, as an exporter sees it: quantized linears, online parts, foreign modules.

After `Method.apply` a model is the transformers model with every offline transform already fused into
its weights (rotations, smoothing, norms); what is left on top of it is
- QuantLinear wrappers (harness.quant): the fake-quantized weight, an activation format, and optionally an
  online input transform (QuaRot's R4, FlatQuant's Kronecker pair, ...);
- inside attention, K/V quantization and an online Q/K rotation (R3);
- modules of the harness or of a method that replace the model's own (a norm, a wrapper).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from harness.formats import Format
from harness.quant.layers import QuantExperts, QuantLinear, kv_format


@dataclass
class QuantizedLinear:
    name: str  # module path in the model
    module: QuantLinear
    weight_format: Format | None
    act_format: Format | None
    online: nn.Module | None


@dataclass
class Inventory:
    linears: list[QuantizedLinear] = field(default_factory=list)
    kv: list[str] = field(default_factory=list)  # attention modules that quantize K/V
    qk_rotations: list[str] = field(default_factory=list)  # attention modules with an online R3
    experts: list[str] = field(default_factory=list)  # fused experts wrapped by the harness
    foreign: list[str] = field(default_factory=list)  # "name (Class)" of other harness / method modules

    @property
    def online(self) -> list[str]:
        return [f"{q.name} ({type(q.online).__name__})" for q in self.linears if q.online is not None]


def _ours(module: nn.Module) -> bool:
    top = type(module).__module__.split(".")[0]
    return top in ("harness", "methods")


def inventory(model: nn.Module, weight_format: Format | None, lm_head_quantized: bool = False,
              head_name: str = "lm_head") -> Inventory:
    """Everything an exporter must express or refuse. `weight_format` is the scheme's weight format: the one
    a wrapper's weight was fake-quantized with when the wrapper did not record it (GPTQ sets weights itself)."""
    out = Inventory()
    inside: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            fmt = module.weight_format or weight_format
            if name.endswith(head_name) and not lm_head_quantized:
                fmt = module.weight_format
            out.linears.append(QuantizedLinear(name, module, fmt, module.act_format, module.input_transform))
            inside.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
        elif isinstance(module, QuantExperts):
            out.experts.append(name)
        if kv_format(module) is not None:
            out.kv.append(name)
        if getattr(module, "qk_rotation", None) is not None:
            out.qk_rotations.append(name)
    for name, module in model.named_modules():
        if name in inside or isinstance(module, (QuantLinear, QuantExperts)) or not _ours(module):
            continue
        if any(name.startswith(q + ".") for q in out.qk_rotations):
            continue
        out.foreign.append(f"{name} ({type(module).__name__})")
    return out
