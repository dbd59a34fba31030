"""Round-to-nearest: every quantizer of the scheme, weights included, with no calibration data."""
from __future__ import annotations

from harness.method import Method, State
from harness.registry import register_method


@register_method("rtn")
class RoundToNearest(Method):
    """Round-to-nearest weights (and activations/KV as the scheme says), no calibration."""

    version = 1
    needs_calibration = False
    uses_seed = False

    def apply(self, model, adapter, state: State, scheme):
        from harness.quant import apply_scheme

        out = apply_scheme(model, adapter, scheme, quantize_weights=True)
        return model if out is None else out
