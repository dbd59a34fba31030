"""Typed method state: a kw_only dataclass saved as `<dir>/state.safetensors` + `<dir>/state.json`.

A method's calibration output subclasses `State`:

    @dataclass(kw_only=True)
    class SiteState:
        u: torch.Tensor
        clip: torch.Tensor | None = None

    @dataclass(kw_only=True)
    class MyState(State):
        layers: list[dict[str, SiteState]]
        alpha: float = 0.5

Fields hold tensors, None, bool/int/float/str, lists/tuples, dicts with str keys and nested dataclasses
of those. One codec flattens the structure: every tensor goes to safetensors under a path-like key
(`layers.3.qkv.u`), the rest to JSON with tensor placeholders and markers for dataclasses, tuples and
dicts (floats exactly, NaN and infinities included). `load` rebuilds the exact types, resolving nested
dataclasses only among the classes reachable from the loading class's type hints (never importing a
name found in the file), and rejects a file whose structure does not match with a one-line
`StateFormatError` naming the file.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch

from harness.errors import PtqbenchError

FORMAT = "ptqbench.state/1"
TENSORS_FILE = "state.safetensors"
STRUCTURE_FILE = "state.json"

_TENSOR, _TUPLE, _DICT, _DATACLASS, _FLOAT = "$tensor", "$tuple", "$dict", "$dataclass", "$float"


class StateError(PtqbenchError):
    """A state that cannot be saved (an unsupported value) or a class whose type hints cannot be resolved."""


class StateFormatError(StateError, ValueError):
    """A state file whose structure does not match the class loading it (or that is not a state file)."""


@dataclass(kw_only=True)
class State:
    """Base of every method's calibration output; subclasses are (kw_only) dataclasses whose fields are
    tensors, None, bool/int/float/str, lists/tuples, dicts with str keys, and nested dataclasses of those."""

    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able run info (steps, diagnostics)

    def save(self, directory: str | os.PathLike) -> None:
        """Write `<directory>/state.safetensors` (every tensor) and `<directory>/state.json` (the rest)."""
        save_state(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> typing.Self:
        """The state saved in `directory`, rebuilt as `cls` (tensors on `device`)."""
        return load_state(cls, directory, device)


# ---- type hints ---------------------------------------------------------------------------------------


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _field_hints(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # NameError for an unresolvable string annotation, ...
        raise StateError(f"state class {_qualname(cls)}: cannot resolve its type hints "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def reachable_dataclasses(cls: type) -> dict[str, type]:
    """Dataclass types reachable from `cls` (itself included) through field type hints, by qualified name:
    the only types a state file may name."""
    found: dict[str, type] = {}
    todo = [cls]
    while todo:
        c = todo.pop()
        if _qualname(c) in found:
            continue
        found[_qualname(c)] = c
        for hint in _field_hints(c).values():
            todo.extend(_dataclasses_in(hint))
    return found


def _dataclasses_in(hint: Any) -> list[type]:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return [hint]
    out = []
    for arg in typing.get_args(hint):
        out.extend(_dataclasses_in(arg))
    return out


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


# ---- encoding -------------------------------------------------------------------------------------------


class _Encoder:
    def __init__(self, allowed: dict[str, type]):
        self.allowed = allowed
        self.tensors: dict[str, torch.Tensor] = {}

    def key(self, path: list[str]) -> str:
        base = ".".join(path) or "tensor"
        key, n = base, 1
        while key in self.tensors:
            key, n = f"{base}~{n}", n + 1
        return key

    def encode(self, value: Any, path: list[str]) -> Any:
        where = ".".join(path) or "<root>"
        if isinstance(value, torch.Tensor):
            key = self.key(path)
            self.tensors[key] = value.detach().cpu().contiguous().clone()
            return {_TENSOR: key, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            if type(value) is not int:  # an IntEnum, ...: it would come back as a plain int
                raise StateError(f"state field {where}: unsupported value of type {type(value).__name__}")
            return value
        if isinstance(value, float):
            if type(value) is not float:
                raise StateError(f"state field {where}: unsupported value of type {type(value).__name__}")
            if math.isfinite(value):
                return value  # json writes repr(value), which reads back to the same float (-0.0 included)
            return {_FLOAT: repr(value)}  # 'nan', 'inf', '-inf'
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = _qualname(type(value))
            if self.allowed.get(name) is not type(value):
                raise StateError(f"state field {where}: dataclass {name} is not reachable from the state class's "
                                 f"type hints (declare it in a field annotation)")
            return {_DATACLASS: name, "fields": {f.name: self.encode(getattr(value, f.name), [*path, f.name])
                                                 for f in dataclasses.fields(value)}}
        if type(value) is list:
            return [self.encode(v, [*path, str(i)]) for i, v in enumerate(value)]
        if type(value) is tuple:
            return {_TUPLE: [self.encode(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if type(value) is dict:
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise StateError(f"state field {where}: dict keys must be str, got {bad[0]!r}")
            return {_DICT: {k: self.encode(v, [*path, k]) for k, v in value.items()}}
        raise StateError(f"state field {where}: unsupported value of type {type(value).__module__}."
                         f"{type(value).__qualname__} (tensors, None, bool/int/float/str, lists, tuples, "
                         f"dicts with str keys and dataclasses only)")


def encode_state(state: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON document, tensors by key) for a state dataclass instance."""
    if not (dataclasses.is_dataclass(state) and not isinstance(state, type)):
        raise StateError(f"a state must be a dataclass instance, got {type(state).__name__}")
    cls = type(state)
    enc = _Encoder(reachable_dataclasses(cls))
    root = enc.encode(state, [])
    return {"format": FORMAT, "type": _qualname(cls), "root": root}, enc.tensors


def save_state(state: Any, directory: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    doc, tensors = encode_state(state)
    text = json.dumps(doc, indent=1, allow_nan=False)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # write both next to their final names, then rename: a crash leaves no half-written state
    tmp_t, tmp_j = directory / (TENSORS_FILE + ".tmp"), directory / (STRUCTURE_FILE + ".tmp")
    save_file(tensors, str(tmp_t), metadata={"format": FORMAT})
    tmp_j.write_text(text)
    os.replace(tmp_t, directory / TENSORS_FILE)
    os.replace(tmp_j, directory / STRUCTURE_FILE)


# ---- decoding -------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """Internal: where and how the file disagrees with the class (turned into a StateFormatError)."""

    def __init__(self, path: list[str], msg: str):
        super().__init__(f"{'.'.join(path) or '<root>'}: {msg}")


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__qualname__
    return str(hint).replace("typing.", "")


def _marker(value: Any, name: str) -> bool:
    return isinstance(value, dict) and name in value


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        for m in (_TENSOR, _TUPLE, _DICT, _DATACLASS, _FLOAT):
            if m in value:
                return {"$tensor": "a tensor", "$tuple": "a tuple", "$dict": "a dict", "$float": "a float",
                        "$dataclass": f"a {value[m]}"}[m]
        return "an unknown object"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "None"
    return f"{type(value).__name__} {value!r}"


class _Decoder:
    def __init__(self, allowed: dict[str, type], tensors: dict[str, torch.Tensor]):
        self.allowed = allowed
        self.tensors = tensors
        self.used: set[str] = set()

    def decode(self, value: Any, hint: Any, path: list[str]) -> Any:
        """`value` (from JSON) rebuilt and checked against the type hint `hint`."""
        if hint is Any or hint is object or isinstance(hint, typing.TypeVar):
            return self.decode_any(value, path)
        if _is_union(hint):
            for alt in typing.get_args(hint):
                used = set(self.used)
                try:
                    return self.decode(value, alt, path)
                except _Mismatch:
                    self.used = used  # tensors a failed alternative took are free again
            raise _Mismatch(path, f"expected {_describe(hint)}, found {_kind(value)}")
        origin = typing.get_origin(hint)
        if origin is Literal:
            out = self.decode_any(value, path)
            if not any(type(out) is type(v) and out == v for v in typing.get_args(hint)):
                raise _Mismatch(path, f"expected {_describe(hint)}, found {_kind(value)}")
            return out
        if origin is typing.ClassVar or origin is typing.Annotated:
            return self.decode(value, typing.get_args(hint)[0], path)
        args = typing.get_args(hint)
        if hint is type(None):
            if value is not None:
                raise _Mismatch(path, f"expected None, found {_kind(value)}")
            return None
        if hint is torch.Tensor or (isinstance(hint, type) and issubclass(hint, torch.Tensor)):
            if not _marker(value, _TENSOR):
                raise _Mismatch(path, f"expected a tensor, found {_kind(value)}")
            return self.tensor(value, path)
        if hint is bool:
            if type(value) is not bool:
                raise _Mismatch(path, f"expected bool, found {_kind(value)}")
            return value
        if hint is int:
            if type(value) is not int:
                raise _Mismatch(path, f"expected int, found {_kind(value)}")
            return value
        if hint is float:
            if type(value) is int or type(value) is float:
                return value
            if _marker(value, _FLOAT):
                return self.decode_any(value, path)
            raise _Mismatch(path, f"expected float, found {_kind(value)}")
        if hint is str:
            if type(value) is not str:
                raise _Mismatch(path, f"expected str, found {_kind(value)}")
            return value
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not _marker(value, _DATACLASS):
                raise _Mismatch(path, f"expected a {_qualname(hint)}, found {_kind(value)}")
            cls = self.allowed.get(value[_DATACLASS])
            if cls is None or not issubclass(cls, hint):
                raise _Mismatch(path, f"expected a {_qualname(hint)}, found a {value[_DATACLASS]}")
            return self.dataclass(value, cls, path)
        if hint is list or origin is list:
            if not isinstance(value, list):
                raise _Mismatch(path, f"expected a list, found {_kind(value)}")
            item = args[0] if args else Any
            return [self.decode(v, item, [*path, str(i)]) for i, v in enumerate(value)]
        if hint is tuple or origin is tuple:
            if not _marker(value, _TUPLE):
                raise _Mismatch(path, f"expected a tuple, found {_kind(value)}")
            items = value[_TUPLE]
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                item = args[0] if args else Any
                return tuple(self.decode(v, item, [*path, str(i)]) for i, v in enumerate(items))
            if args == ((),):  # tuple[()]
                args = ()
            if len(items) != len(args):
                raise _Mismatch(path, f"expected {_describe(hint)}, found a tuple of {len(items)}")
            return tuple(self.decode(v, a, [*path, str(i)]) for i, (v, a) in enumerate(zip(items, args)))
        if hint is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
            if not _marker(value, _DICT):
                raise _Mismatch(path, f"expected a dict, found {_kind(value)}")
            item = args[1] if len(args) == 2 else Any
            return {k: self.decode(v, item, [*path, k]) for k, v in value[_DICT].items()}
        if origin in (collections.abc.Sequence, collections.abc.Iterable):
            if isinstance(value, list):
                return self.decode(value, list[args[0]] if args else list, path)
            return self.decode(value, tuple[args[0], ...] if args else tuple, path)
        # any other annotation: decode freely, then check the class when there is one
        out = self.decode_any(value, path)
        check = origin if isinstance(origin, type) else hint
        if isinstance(check, type) and not isinstance(out, check):
            raise _Mismatch(path, f"expected {_describe(hint)}, found {_kind(value)}")
        return out

    def decode_any(self, value: Any, path: list[str]) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode_any(v, [*path, str(i)]) for i, v in enumerate(value)]
        if not isinstance(value, dict) or len([k for k in value if k.startswith("$")]) != 1:
            raise _Mismatch(path, f"not a state value: {json.dumps(value)[:80]}")
        if _TENSOR in value:
            return self.tensor(value, path)
        if _FLOAT in value:
            text = value[_FLOAT]
            if text not in ("nan", "inf", "-inf"):
                raise _Mismatch(path, f"bad float {text!r}")
            return float(text)
        if _TUPLE in value:
            if not isinstance(value[_TUPLE], list):
                raise _Mismatch(path, "bad tuple")
            return tuple(self.decode_any(v, [*path, str(i)]) for i, v in enumerate(value[_TUPLE]))
        if _DICT in value:
            if not isinstance(value[_DICT], dict):
                raise _Mismatch(path, "bad dict")
            return {k: self.decode_any(v, [*path, k]) for k, v in value[_DICT].items()}
        if _DATACLASS in value:
            cls = self.allowed.get(value[_DATACLASS])
            if cls is None:
                raise _Mismatch(path, f"dataclass {value[_DATACLASS]} is not reachable from the loading class")
            return self.dataclass(value, cls, path)
        raise _Mismatch(path, f"not a state value: {json.dumps(value)[:80]}")

    def tensor(self, value: dict, path: list[str]) -> torch.Tensor:
        key = value.get(_TENSOR)
        if key not in self.tensors:
            raise _Mismatch(path, f"tensor {key!r} is missing from {TENSORS_FILE}")
        if key in self.used:
            raise _Mismatch(path, f"tensor {key!r} is referenced twice")
        t = self.tensors[key]
        dtype, shape = str(t.dtype).removeprefix("torch."), list(t.shape)
        if value.get("dtype") != dtype or value.get("shape") != shape:
            raise _Mismatch(path, f"tensor {key!r} is {dtype}{shape} in {TENSORS_FILE}, "
                                  f"{value.get('dtype')}{value.get('shape')} in {STRUCTURE_FILE}")
        self.used.add(key)
        return t

    def dataclass(self, value: dict, cls: type, path: list[str]) -> Any:
        fields = value.get("fields")
        if not isinstance(fields, dict):
            raise _Mismatch(path, f"bad {_qualname(cls)} record")
        hints = _field_hints(cls)
        missing = [n for n in hints if n not in fields]
        extra = [n for n in fields if n not in hints]
        if missing or extra:
            parts = ([f"missing field(s) {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown field(s) {', '.join(extra)}"] if extra else [])
            raise _Mismatch(path, f"{_qualname(cls)}: {'; '.join(parts)}")
        decoded = {n: self.decode(fields[n], hint, [*path, n]) for n, hint in hints.items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            obj = cls(**{n: v for n, v in decoded.items() if n in init})
        except Exception as exc:
            raise _Mismatch(path, f"{_qualname(cls)}(...) failed: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())}") from None
        for n, v in decoded.items():
            if n not in init:
                object.__setattr__(obj, n, v)
        return obj


def load_state(cls: type, directory: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    jpath, tpath = directory / STRUCTURE_FILE, directory / TENSORS_FILE

    def fail(msg: str) -> StateFormatError:
        return StateFormatError(f"state file {jpath}: {' '.join(msg.split())}")

    allowed = reachable_dataclasses(cls)
    try:
        doc = json.loads(jpath.read_text())
    except json.JSONDecodeError as exc:
        raise fail(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "root" not in doc:
        raise fail(f"not a {FORMAT} file")
    if doc.get("type") != _qualname(cls):
        raise fail(f"holds a {doc.get('type')}, not a {_qualname(cls)}")
    try:
        tensors = load_file(str(tpath), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise fail(f"unreadable {TENSORS_FILE} ({type(exc).__name__}: {exc})") from None
    dec = _Decoder(allowed, tensors)
    try:
        state = dec.decode(doc["root"], cls, [])
    except _Mismatch as exc:
        raise fail(f"does not match {_qualname(cls)}: {exc}") from None
    unused = sorted(set(tensors) - dec.used)
    if unused:
        raise fail(f"{TENSORS_FILE} holds tensors the structure does not reference: {', '.join(unused[:5])}")
    return state


# ---- equality ------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def _floats_equal(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _difference(a: Any, b: Any, path: str, skip: frozenset[str] = frozenset()) -> str | None:
    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if not torch.equal(_bits(a), _bits(b)):
            x, y = a.detach().cpu(), b.detach().cpu()
            n = int((x != y).sum()) if x.dtype.is_floating_point or x.dtype.is_complex else "some"
            gap = float((x.double() - y.double()).abs().nan_to_num(nan=math.inf).max()) \
                if x.dtype.is_floating_point and x.numel() else None
            return f"{where}: tensors differ ({n} of {x.numel()} elements" + \
                (f", max |diff| {gap:.3g})" if gap is not None else ")")
        return None
    if type(a) is not type(b):
        return f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, float):
        return None if _floats_equal(a, b) else f"{where}: {a!r} vs {b!r}"
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := _difference(x, y, f"{path}.{i}" if path else str(i))) is not None:
                return d
        return None
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))[:5]} in only one"
        for k in a:
            if (d := _difference(a[k], b[k], f"{path}.{k}" if path else str(k))) is not None:
                return d
        return None
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        for f in dataclasses.fields(a):
            if f.name in skip:
                continue
            d = _difference(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}" if path else f.name)
            if d is not None:
                return d
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def state_difference(a: Any, b: Any, *, meta: bool = True) -> str | None:
    """Where two states first differ (`'layers.3.u: tensors differ (...)'`), None when `states_equal`."""
    return _difference(a, b, "", frozenset() if meta else frozenset({"meta"}))


def states_equal(a: Any, b: Any, *, meta: bool = True) -> bool:
    """Same type, same structure (tuples vs lists, dict keys, bool vs int vs float), scalars equal
    (NaN equals NaN, -0.0 differs from 0.0) and tensors equal bit for bit with the same dtype and shape
    (any device). `meta=False` ignores the top-level `meta` field (run diagnostics such as timings)."""
    return state_difference(a, b, meta=meta) is None
