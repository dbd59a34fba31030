"""Element rounding: put already-scaled fp32 values on an element grid.

All arithmetic is fp32 and exact except for the one rounding step, which is round-to-nearest-even
(torch.round), so the Triton kernels can reproduce it bit for bit.
"""
from __future__ import annotations

import torch

from harness.formats.spec import FLOAT_ELEMENTS, FloatElement


def round_to_float_element(y: torch.Tensor, element: FloatElement | str) -> torch.Tensor:
    """Round fp32 `y` to the nearest value of a small float type (RNE), saturating to +-max_normal.

    Subnormals of the element type are kept (they share the smallest normal's step). NaN stays NaN,
    +-Inf saturates to +-max_normal; the sign of zero is kept.
    """
    if isinstance(element, str):
        element = FLOAT_ELEMENTS[element]
    a = y.abs()
    # The grid spacing at |y| is 2^(max(floor(log2|y|), min_exponent) - mbits). Read floor(log2|y|)
    # from the fp32 exponent field and build the power of two from bits: exact, and several times
    # faster than frexp/ldexp on CPU. fp32 subnormals (field 0) fall under the clamp; Inf/NaN
    # (field 255) give a huge step, then saturate / stay NaN below.
    field = (a.view(torch.int32) >> 23) & 0xFF
    step_field = torch.clamp_min(field, element.min_exponent + 127) - element.mbits
    step = (step_field << 23).view(torch.float32)
    q = torch.round(a / step) * step  # exact: step is a power of two, a/step < 2^(mbits+1)
    q = torch.clamp_max(q, element.max_normal)
    return torch.copysign(q, y)


def round_to_int(y: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """Round to the nearest integer (RNE) and clamp to [qmin, qmax]."""
    return torch.clamp(torch.round(y), qmin, qmax)
