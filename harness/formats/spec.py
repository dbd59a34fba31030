"""Declarative number-format specs.

A `Format` says how a tensor is fake-quantized along its last dimension: the element type, how
elements are grouped under one scale, and the scale's own type. Presets live in `presets.py`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from harness.errors import InvalidValueError


@dataclass(frozen=True)
class FloatElement:
    """A small IEEE-like float: 1 sign bit, `ebits` exponent bits, `mbits` mantissa bits.

    All element types here saturate at `max_normal` (no Inf): the OCP MX and NVFP4 conventions.
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max_normal: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def min_exponent(self) -> int:  # exponent of the smallest normal; subnormals share it
        return 1 - self.bias


FLOAT_ELEMENTS = {
    "e2m1": FloatElement("e2m1", 2, 1, 1, 6.0),
    "e2m3": FloatElement("e2m3", 2, 3, 1, 7.5),
    "e3m2": FloatElement("e3m2", 3, 2, 3, 28.0),
    "e4m3": FloatElement("e4m3", 4, 3, 7, 448.0),  # e4m3fn: no Inf, max 448
    "e5m2": FloatElement("e5m2", 5, 2, 15, 57344.0),
}
ELEMENT_TYPES = ("int", *FLOAT_ELEMENTS)
SCALE_TYPES = ("fp32", "e8m0", "e4m3")
SCALE_ROUNDINGS = ("floor", "ceil", "round", "rceil", "floor43")
FOUR_OVER_SIX_RULES = ("mse", "mae", "abs_max")
GRANULARITIES = ("tensor", "row", "group")

# E8M0 shared scales cover 2^-127 .. 2^127 (0xFF is NaN).
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


@dataclass(frozen=True)
class Format:
    """How to fake-quantize a tensor along its last dimension.

    granularity: "tensor" (one scale), "row" (one scale per row of the last dim: per-token for
        activations, per-output-channel for [out, in] weights) or "group" (`group_size` consecutive
        elements of the last dim share a scale; MX blocks are groups of 32, NV blocks groups of 16).
    scale_type: "fp32" (amax / qmax), "e8m0" (power-of-two shared exponent, OCP MX) or "e4m3"
        (NVFP4-style: FP8 E4M3 block scale times an fp32 per-tensor scale amax / (qmax * 448);
        amax / (qmax * 256) with four_over_six).
    scale_rounding: how an E8M0 exponent is chosen from the group's amax (see scales.py):
        floor (OCP spec), ceil (never clips), round, rceil (fp32 amax/qmax rounded up), floor43
        (FP-Quant's MXFP4 rule: the floor exponent's power of two divided by 0.75, so amax/scale lies
        in [3, 6) for e2m1 and nothing saturates).
    clip_ratio: the group's amax (or min/max) is multiplied by this before the scale is chosen.
    four_over_six: None, or Four Over Six (Cook et al. 2025) adaptive block scaling for NVFP4: each
        block tries its amax mapped to 6 and to 4 and keeps the scale with the lower error, measured
        as "mse" (sum of squares), "mae" (sum of |error|) or "abs_max" (max |error|); the per-tensor
        scale then uses an E4M3 cap of 256 instead of 448 (see quantize.py).
    """

    name: str
    element: str
    bits: int
    symmetric: bool = True
    granularity: str = "row"
    group_size: int | None = None
    scale_type: str = "fp32"
    scale_rounding: str = "floor"
    clip_ratio: float = 1.0
    four_over_six: str | None = None

    def __post_init__(self) -> None:
        if self.element not in ELEMENT_TYPES:
            raise InvalidValueError("element type", self.element, ", ".join(ELEMENT_TYPES))
        if self.element != "int" and self.bits != FLOAT_ELEMENTS[self.element].bits:
            raise InvalidValueError(
                f"bits for element {self.element}", self.bits, str(FLOAT_ELEMENTS[self.element].bits)
            )
        if self.element == "int" and not 2 <= self.bits <= 16:
            raise InvalidValueError("integer bits", self.bits, "2..16")
        if self.granularity not in GRANULARITIES:
            raise InvalidValueError("granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise InvalidValueError("group_size", self.group_size, "a positive integer for granularity 'group'")
        elif self.group_size is not None:
            raise InvalidValueError("group_size", self.group_size, f"None for granularity {self.granularity!r}")
        if self.scale_type not in SCALE_TYPES:
            raise InvalidValueError("scale_type", self.scale_type, ", ".join(SCALE_TYPES))
        if self.scale_rounding not in SCALE_ROUNDINGS:
            raise InvalidValueError("scale_rounding", self.scale_rounding, ", ".join(SCALE_ROUNDINGS))
        if self.four_over_six is not None:
            if self.four_over_six not in FOUR_OVER_SIX_RULES:
                raise InvalidValueError("four_over_six", self.four_over_six, ", ".join(["None", *FOUR_OVER_SIX_RULES]))
            if self.scale_type != "e4m3" or self.element != "e2m1":
                raise InvalidValueError(
                    f"four_over_six for {self.element} elements with {self.scale_type} scales",
                    self.four_over_six,
                    "None (Four Over Six needs NVFP4: e2m1 elements with e4m3 block scales)",
                )
        if not 0.0 < self.clip_ratio <= 1.0:
            raise InvalidValueError("clip_ratio", self.clip_ratio, "0 < clip_ratio <= 1")
        if not self.symmetric and (self.element != "int" or self.scale_type != "fp32"):
            raise InvalidValueError("symmetric", self.symmetric, "False only for int elements with fp32 scales")
        if self.scale_type != "fp32" and self.granularity != "group":
            raise InvalidValueError(
                f"granularity for scale_type {self.scale_type}", self.granularity, "group (block scales)"
            )

    # ---- derived properties -------------------------------------------------------------
    @property
    def qmax(self) -> float:
        """Largest element magnitude (symmetric INT: 2^(b-1)-1, as QuaRot/OCP MXINT; FP: max normal)."""
        if self.element == "int":
            return float(2 ** (self.bits - 1) - 1)
        return FLOAT_ELEMENTS[self.element].max_normal

    @property
    def levels(self) -> int:
        """Number of integer levels of an asymmetric INT format (0 .. 2^b - 1)."""
        return 2**self.bits - 1

    @property
    def emax_elem(self) -> int:
        """Exponent of the largest power of two <= qmax (OCP: emax of the element type)."""
        return math.floor(math.log2(self.qmax))

    @property
    def float_element(self) -> FloatElement | None:
        return FLOAT_ELEMENTS.get(self.element)

    @property
    def bits_per_element(self) -> float:
        """Storage cost including the amortised scale (for plots: metric vs bits)."""
        if self.granularity != "group":
            return float(self.bits)
        scale_bits = {"fp32": 16 if self.symmetric else 32, "e8m0": 8, "e4m3": 8}[self.scale_type]
        return self.bits + scale_bits / self.group_size

    def with_(self, **overrides) -> Format:
        """A copy with fields replaced (validated)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """Every field that changes a number, for run records and hashes. four_over_six is left out when
        None, so the records (and hashes) of formats from before the field existed stay as they were."""
        fields = dataclasses.asdict(self)
        if fields["four_over_six"] is None:
            del fields["four_over_six"]
        return fields
