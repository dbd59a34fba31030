"""Loading a spec's YAML, and pointing every error at its line: `file:line: key.path: what is wrong`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from harness.errors import PtqbenchError
from harness.spec.schema import Matrix, SpecFile

_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


class SpecError(PtqbenchError, ValueError):
    """A bad experiment spec: one line, `file:line: what is wrong; the choices`."""


#: The most characters of a user-supplied value (or a whole message) an error echoes.
ECHO_LIMIT = 200


def one_line(text: object, limit: int = 4 * ECHO_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def short(value: object, limit: int = ECHO_LIMIT) -> str:
    """repr(value), cut to `limit` characters: an error never echoes a huge value."""
    try:
        text = reprlib_repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not hide the error
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def reprlib_repr(value: object) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = ECHO_LIMIT, ECHO_LIMIT, 8, 8, 4
    return r.repr(value)


class Located:
    """Maps a key path (e.g. ("methods", 2, "params")) to its line in the YAML file."""

    def __init__(self, path: str, node: yaml.Node | None):
        self.path, self.node = path, node

    def line(self, loc: tuple) -> int | None:
        node, best = self.node, None
        for part in loc:
            if node is None:
                break
            best = node.start_mark.line + 1
            if isinstance(node, yaml.MappingNode):
                nxt = None
                for k, v in node.value:
                    if k.value == str(part):
                        nxt, best = v, k.start_mark.line + 1
                        break
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
            else:
                node = None
        if node is not None:
            best = node.start_mark.line + 1
        return best

    def error(self, loc: tuple, message: str) -> SpecError:
        line = self.line(loc) if loc else None
        where = f"{self.path}:{line}" if line else self.path
        keys = ".".join(str(p) for p in loc)
        return SpecError(one_line(f"{where}: {keys + ': ' if keys else ''}{message}"))


def pydantic_error(where: Located, exc: ValidationError, prefix: tuple = (),
                   model: type[BaseModel] | None = None) -> SpecError:
    """One line from the most specific pydantic error, located in the file."""
    errors = exc.errors()
    err = next((e for e in errors if e.get("type") == "extra_forbidden"), None) or max(errors, key=lambda e: len(e["loc"]))
    loc = tuple(err.get("loc", ()))
    # drop union-branch labels such as 'str' or 'list[int]' that pydantic puts into the location
    loc = prefix + tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_LABELS)))
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        owner = _owner(loc[len(prefix):-1], model)
        allowed = f"; valid keys: {', '.join(owner.model_fields)}" if owner else ""
        return where.error(loc, f"unknown key {short(loc[-1])}{allowed}")
    value = err.get("input")
    if not isinstance(value, dict):
        msg = f"{msg} (got {short(value)})"
    return where.error(loc, msg)


def _owner(rel: tuple, model: type[BaseModel] | None) -> type[BaseModel] | None:
    if not rel:
        return model
    if model is SpecFile and len(rel) == 2 and rel[0] == "scales":
        return Matrix
    return None


#: Most nodes a spec may expand to once its aliases are followed (a "billion laughs" spec is refused).
MAX_EXPANDED_NODES = 100_000


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    spec_path = "spec"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeConstructor reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise SpecError(one_line(f"{self.spec_path}:{line}: duplicate key {short(key)} "
                                             f"(first given at line {first}); give each key once"))
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes in the document with every alias expanded, counted without expanding (memoised by node)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            return limit + 1  # a recursive alias expands forever
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k) + size(v)
                if total > limit:
                    break
        active.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(node)


def load_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], Located]:
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec {short(path)}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: spec is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    loader = _SpecLoader(text)
    loader.spec_path = path
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, MAX_EXPANDED_NODES) > MAX_EXPANDED_NODES:
            raise SpecError(f"{path}: spec expands to more than {MAX_EXPANDED_NODES} YAML nodes once its "
                            f"aliases are followed (recursive or nested aliases); refusing it")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(one_line(f"{where}: malformed YAML: {problem}", ECHO_LIMIT)) from None
    except RecursionError:
        raise SpecError(f"{path}: spec nests too deeply; refusing it") from None
    finally:
        loader.dispose()
    if data is None:
        raise SpecError(f"{path}: spec is empty; expected a mapping with models, methods, schemes, tasks")
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: spec must be a mapping of keys, got {type(data).__name__}")
    return data, Located(path, node)
