"""Named format presets and the name parser.

Besides the fixed presets, integer formats can be named by pattern:
    int{b}[_asym][_g{N}|_tensor]      e.g. int4, int8, int4_g128, int3_asym_g64, int8_tensor
Anything else is an error listing the presets.
"""
from __future__ import annotations

import dataclasses
import re

from harness.errors import InvalidValueError, UnknownNameError
from harness.formats.spec import Format


def _mx(name: str, element: str, bits: int) -> Format:
    return Format(name, element, bits, granularity="group", group_size=32, scale_type="e8m0", scale_rounding="floor")


def _nv(name: str, element: str, bits: int, four_over_six: str | None = None) -> Format:
    return Format(name, element, bits, granularity="group", group_size=16, scale_type="e4m3", four_over_six=four_over_six)


PRESETS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("int4", "int", 4),
        Format("int8", "int", 8),
        Format("int4_g128", "int", 4, granularity="group", group_size=128),
        Format("int4_asym_g128", "int", 4, symmetric=False, granularity="group", group_size=128),
        Format("fp8_e4m3", "e4m3", 8),
        Format("fp8_e5m2", "e5m2", 8),
        _mx("mxfp4", "e2m1", 4),
        _mx("mxfp6_e2m3", "e2m3", 6),
        _mx("mxfp6_e3m2", "e3m2", 6),
        _mx("mxfp8_e4m3", "e4m3", 8),
        _mx("mxfp8_e5m2", "e5m2", 8),
        _mx("mxint8", "int", 8),
        _mx("mxint4", "int", 4),
        _nv("nvfp4", "e2m1", 4),
        _nv("nvfp4_4o6", "e2m1", 4, four_over_six="mse"),  # Four Over Six (Cook et al. 2025), MSE selection
        _nv("nvint4", "int", 4),
    ]
}
ALIASES = {"mxfp8": "mxfp8_e4m3", "mxfp6": "mxfp6_e2m3", "fp8": "fp8_e4m3"}

_INT_PATTERN = re.compile(r"^int(?P<bits>\d+)(?P<asym>_asym)?(?:_g(?P<group>\d+)|(?P<tensor>_tensor))?$")


def _parse_int_name(name: str) -> Format | None:
    match = _INT_PATTERN.match(name)
    if not match:
        return None
    bits = int(match["bits"])
    if not 2 <= bits <= 16:
        raise InvalidValueError(f"integer bits in format name {name!r}", bits, "2..16")
    if match["group"]:
        granularity, group = "group", int(match["group"])
    else:
        granularity, group = ("tensor" if match["tensor"] else "row"), None
    return Format(name, "int", bits, symmetric=not match["asym"], granularity=granularity, group_size=group)


def list_formats() -> list[str]:
    """Preset names (integer formats also accept the int{b}[_asym][_g{N}|_tensor] pattern)."""
    return sorted(PRESETS)


def get_format(name: str | Format, **overrides) -> Format:
    """A preset (or pattern-named INT format) with optional field overrides.

    get_format("mxfp4", scale_rounding="ceil"); get_format("int4", clip_ratio=0.9);
    get_format("nvfp4", four_over_six="mae")
    """
    if isinstance(name, Format):
        fmt = name
    else:
        key = ALIASES.get(name, name)
        fmt = PRESETS.get(key) or _parse_int_name(key)
        if fmt is None:
            raise UnknownNameError("format", name, [*PRESETS, "int{b}[_asym][_g{N}|_tensor]"])
    if not overrides:
        return fmt
    fields = [f.name for f in dataclasses.fields(Format)]  # not to_dict(): it leaves out unset options
    unknown = set(overrides) - set(fields)
    if unknown:
        raise UnknownNameError("format field", sorted(unknown)[0], fields)
    return fmt.with_(**overrides)
