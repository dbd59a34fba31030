"""Method registry: `@register_method("name")`, the built-in `methods` package, and entry points.

Built-in methods register themselves when their module in the `methods` package is imported.
Outside packages plug in through the `ptqbench.methods` entry-point group, e.g. in their pyproject:

    [project.entry-points."ptqbench.methods"]
    mymethod = "my_pkg.my_method:MyMethod"     # or just "my_pkg.my_method" (the import registers it)

A module that fails to import does not break the others: the error is kept and shown when that
name is asked for (and in `ptqbench list methods`).
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata

from harness.errors import PtqbenchError, UnknownNameError
from harness.method import Method

ENTRY_POINT_GROUP = "ptqbench.methods"

_METHODS: dict[str, type[Method]] = {}
_BROKEN: dict[str, str] = {}  # name (module or entry point) -> one-line import error
_discovered = False


class MethodLoadError(PtqbenchError):
    """A registered method whose module failed to import."""


def register_method(name: str):
    """Class decorator: register a `Method` subclass under `name` (sets `cls.name`)."""

    def decorator(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise PtqbenchError(f"@register_method({name!r}) expects a Method subclass, got {cls!r}")
        existing = _METHODS.get(name)
        if existing is not None and _qualname(existing) != _qualname(cls):
            raise PtqbenchError(f"method name {name!r} is already registered by {_qualname(existing)}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def discover(force: bool = False) -> None:
    """Import the built-in `methods` package modules and load the entry-point plugins (once)."""
    global _discovered
    if _discovered and not force:
        return
    _discovered = True
    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"methods.{info.name}")
        except Exception as exc:  # keep going: one broken plugin must not hide the others
            _BROKEN[info.name] = _one_line(exc)
            continue
        # A module imported before a registry reset registered nothing this time: pick its classes up.
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Method) and obj.__module__ == module.__name__
                    and obj.name and obj.name not in _METHODS):
                _METHODS[obj.name] = obj
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            _BROKEN[ep.name] = _one_line(exc)
            continue
        if isinstance(obj, type) and issubclass(obj, Method) and obj not in _METHODS.values():
            register_method(ep.name)(obj)


def list_methods() -> list[str]:
    discover()
    return sorted(_METHODS)


def broken_methods() -> dict[str, str]:
    """Plugins that failed to import, with their one-line error."""
    discover()
    return dict(_BROKEN)


def get_method(name: str) -> type[Method]:
    discover()
    if name in _METHODS:
        return _METHODS[name]
    if name in _BROKEN:
        raise MethodLoadError(f"method {name!r} failed to import: {_BROKEN[name]}")
    raise UnknownNameError("method", name, _METHODS)
