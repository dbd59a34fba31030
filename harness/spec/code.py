"""The code that computes a number is part of its id.

A hand-bumped `method_version` was forgotten once (GPTQ's numerics changed, its shipped records kept their
ids, and resume reused stale numbers). So every run id also hashes the source of the modules that can move
its number: the method's module and the engine (`harness.runner`), with every module they import,
transitively (function-level imports included), inside `harness`, `methods` and the method's own package.

The trade-off, chosen on purpose:
- What is hashed is each module's syntax tree without docstrings, so comments, docstrings and formatting
  never change an id; any code change in that import closure does, even one that leaves the numbers alone
  (a rerun then recomputes: safe, and the cost of one smoke matrix).
- Code outside the closure (reports, CLI, executors, the store, W&B) never changes an id.
- Third-party libraries are covered by their versions (`versions` in the key), not by their source.
- The cost of recomputing after an edit is bounded by `harness.fingerprint`: a record that lists the code it
  executed is adopted under its new id when none of that code changed.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

#: Packages whose source is hashed (a method plugin's own top-level package is added per method).
TRACKED = ("harness", "methods")
#: The engine every run goes through: loading, calibration driver, quantized execution, evaluation.
ENGINE = "harness.runner"


#: Modules that only name, move, store or print numbers: neither hashed nor followed.
NOT_COMPUTING = ("harness.spec", "harness.store", "harness.claims", "harness.progress", "harness.registry",
                 "harness.errors", "harness.devices", "harness.env", "harness.tracking", "harness.report",
                 "harness.cli", "harness.executors", "harness.driver", "harness.reproduce", "harness.fingerprint")


@functools.lru_cache(maxsize=None)
def _package_dir(top: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(top)  # imports nothing below the top-level package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def module_path(name: str) -> Path | None:
    """The source file of a module inside a tracked package (a package's __init__.py), found on disk."""
    parts = name.split(".")
    root = _package_dir(parts[0])
    if root is None:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py") if len(parts) > 1 else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _is_package(name: str) -> bool:
    path = module_path(name)
    return path is not None and path.name == "__init__.py"


def _skipped(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in NOT_COMPUTING)


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


def _imported(name: str, tree: ast.Module) -> set[str]:
    """Every module `name`'s code imports (absolute names; `from x import y` adds x.y when y is a module)."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def closure(roots: Iterable[str], tracked: Iterable[str] = TRACKED) -> list[str]:
    """`roots` and every tracked module they import, transitively (parents packages included), sorted."""
    tops = set(tracked)
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name.split(".")[0] not in tops or _skipped(name):
            continue
        path = module_path(name)
        if path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        stack += sorted(_imported(name, _parsed(path)))
    return sorted(seen)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def _module_digest(path: Path) -> str:
    tree = _strip_docstrings(ast.parse(path.read_bytes(), filename=str(path)))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def code_hash(roots: tuple[str, ...]) -> str:
    """A hash of the code of `roots`' import closure (see the module docstring); 16 hex digits."""
    tracked = set(TRACKED) | {r.split(".")[0] for r in roots}
    h = hashlib.sha256()
    for name in closure(roots, tracked):
        h.update(f"{name}:{_module_digest(module_path(name))}\n".encode())
    return h.hexdigest()[:16]


#: What a calibration runs besides the method: the kit, data, models and quantizers (not the evaluators).
CALIB_ENGINE = ("harness.calib", "harness.data", "harness.models", "harness.quant", "harness.method", "harness.state")


def method_code_hash(method_module: str) -> str:
    """The code behind a run of a method defined in `method_module`: that module and the engine."""
    return code_hash((method_module, ENGINE))


def calib_code_hash(method_module: str) -> str:
    """The code behind a cached calibration: the method's module and the calibration engine."""
    return code_hash((method_module, *CALIB_ENGINE))
