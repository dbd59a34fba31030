"""The full-precision baseline: the model as loaded, nothing quantized."""
from __future__ import annotations

from harness.method import Method, State
from harness.registry import register_method


@register_method("fp")
class FullPrecision(Method):
    """Full-precision baseline (no quantization; recorded under scheme w16a16)."""

    version = 1
    needs_calibration = False
    uses_scheme = False
    uses_seed = False

    def apply(self, model, adapter, state: State, scheme):
        return model
