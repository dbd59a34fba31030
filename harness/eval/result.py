"""The result of one evaluation: a number, its metric, and the protocol that produced it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.errors import PtqbenchError


class NonFiniteError(PtqbenchError, FloatingPointError):
    """The model produced NaN/Inf logits (or a non-finite metric): the run has no usable number."""


@dataclass
class EvalResult:
    """`value` of `metric` (e.g. ppl 21.6), how it was measured (`protocol`), and side numbers (`extra`).

    protocol: dataset, split, seqlen, windows, tokens, dtype, batch size, seed, library versions...
    everything needed to say whether two numbers are comparable. extra: secondary metrics and timings.
    """

    value: float
    metric: str
    protocol: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(value=float(d["value"]), metric=str(d["metric"]), protocol=dict(d.get("protocol") or {}),
                   extra=dict(d.get("extra") or {}))

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that can move an evaluation number."""
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers", "tokenizers", "lm-eval"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    try:
        import harness

        out["ptqbench"] = harness.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def model_dtype(model: Any) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except (StopIteration, AttributeError):
        return str(getattr(model, "dtype", "unknown")).replace("torch.", "")


def model_device(model: Any):
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device(getattr(model, "device", "cpu"))
