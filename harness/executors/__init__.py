"""Executors decide where cells run; each yields the cells' records as they finish (the driver writes them).

Built-ins are named here and imported on first use, so `local` never pulls in Ray. Outside packages
add executors through the `ptqbench.executors` entry-point group, e.g. in their pyproject:

    [project.entry-points."ptqbench.executors"]
    slurm = "my_pkg.slurm:SlurmExecutor"     # or just "my_pkg.slurm" (the import registers it)
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.errors import PtqbenchError, UnknownNameError

ENTRY_POINT_GROUP = "ptqbench.executors"
BUILTIN = {"local": "harness.executors.local:LocalExecutor", "ray": "harness.executors.ray:RayExecutor"}


class ExecutorLoadError(PtqbenchError):
    """An executor whose module failed to import, or whose entry point names no Executor."""


class Executor:
    """Runs cells somewhere and yields their records as they finish."""

    name = "base"
    #: Cells run where the driver's data mirror is (this machine): the driver checks the data before any work.
    local_data = True

    def run(self, cells: Iterable, store_root: Path) -> Iterator[dict[str, Any]]:
        """`cells` is drawn lazily: the driver claims a cell's runs as it is drawn, so an executor that
        takes one cell at a time shares a matrix with other drivers on the same results directory."""
        raise NotImplementedError


_EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str):
    """Class decorator: register an `Executor` subclass under `name` (sets `cls.name`)."""

    def decorator(cls: type[Executor]) -> type[Executor]:
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            raise PtqbenchError(f"@register_executor({name!r}) expects an Executor subclass, got {cls!r}")
        cls.name = name
        _EXECUTORS[name] = cls
        return cls

    return decorator


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_executors() -> list[str]:
    """Every executor name, registered or importable (nothing is imported)."""
    return sorted({*_EXECUTORS, *BUILTIN, *_entry_points()})


def _load(name: str, target: str) -> type[Executor]:
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            obj = getattr(obj, part)
    except Exception as exc:  # one line, naming the executor: a broken plugin is not a traceback
        raise ExecutorLoadError(f"executor {name!r} ({target}) failed to import: "
                                f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
    if isinstance(obj, type) and issubclass(obj, Executor) and name not in _EXECUTORS:
        register_executor(name)(obj)
    if name not in _EXECUTORS:
        raise ExecutorLoadError(f"executor {name!r} ({target}) names no Executor subclass and registers none")
    return _EXECUTORS[name]


def executor_class(name: str) -> type[Executor]:
    if name in _EXECUTORS:
        return _EXECUTORS[name]
    target = BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise UnknownNameError("executor", name, list_executors())
    return _load(name, target)


def get_executor(name: str, **kwargs) -> Executor:
    """An executor instance by name; unknown names and broken plugins are one-line errors."""
    return executor_class(name)(**kwargs)
