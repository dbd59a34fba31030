"""Which code a run executed, so that its record can outlive edits to code it never ran.

A run id hashes the source of the whole engine closure (harness.spec.code): safe, but an edit anywhere in
the engine re-ids every run, even the ones that never execute the edited lines, and the shipped examples
take hours to recompute. So a record also carries `code_executed`: for every tracked module its process
ran code of, the digest of the module's *skeleton* (the module without its function bodies: imports,
constants, class attributes such as a method's Params defaults and `version`, signatures) and the digest
of every function that ran (its whole definition; nested functions, lambdas and comprehensions count as
their enclosing function). Digests hash syntax trees without docstrings, as the run id does.

`still_current(code_executed)` is true when every listed digest equals the digest of the source on disk
now: nothing the run executed has changed, so the current code computes the same number. The driver then
*adopts* such a record for a run id that has none (same identity: model, method, params, scheme, data,
seed, task, library versions; only the code hash differs), copying it under the new id with
`adopted_from`, instead of recomputing it.

Why this is sound, and where it stops:
- tracing is process-wide and never reset: a record lists everything its process executed until the
  record was made, a superset of what the run needed (a model loaded by an earlier cell included);
- a calibration state loaded from the cache brings the list of the process that computed it (stored in
  its info.json); a state cached without one leaves the record without `code_executed` (never adopted);
- tracing runs in the thread that runs the cells (the runner computes there); a process that already has
  a trace function (a debugger, coverage) records nothing, so nothing is adopted from it;
- a source file changed after tracing started leaves the process's records without `code_executed` (the
  code on disk may no longer be the code that ran);
- what the run id does not cover either stays uncovered: third-party code beyond its version, data files,
  and the dequantised-GGUF disk cache (keyed by file hash and transformers version).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.spec.code import TRACKED, _package_dir, _skipped, _strip_docstrings

_LOCK = threading.Lock()
_SEEN: set = set()  # code objects whose frames started while tracing
_STATE: dict[str, Any] = {"active": False, "complete": False, "started_ns": 0}
_EXTRA_TOPS: set[str] = set()


def _trace(frame, event, arg):  # the global trace function: one set insert per new frame, no line tracing
    _SEEN.add(frame.f_code)
    return None


def start() -> bool:
    """Start recording executed code in this thread (idempotent), only when no tracked computing module
    has been imported yet (the CLI calls it first thing): otherwise code that already ran untraced (an
    import-time table, a cached result) could be missing from the list, and nothing is recorded.
    False when not recording."""
    if os.environ.get("PTQBENCH_TRACE_CODE", "").lower() in ("0", "off", "false", "no"):
        return False  # opted out: no records are adopted later (tracing costs a few % in Python-heavy loops)
    with _LOCK:
        if not _STATE["active"] and sys.gettrace() is None:
            early = not any(_module_of(getattr(m, "__file__", None) or "", TRACKED) not in (None, *TRACKED)
                            for m in list(sys.modules.values()))
            if early:
                sys.settrace(_trace)
                _STATE.update(active=True, complete=True, started_ns=time.time_ns())
        return recording()


def recording() -> bool:
    """Tracing is on in this thread, started before any computing module ran."""
    return _STATE["active"] and _STATE.get("complete", False) and sys.gettrace() is _trace


def track_package(top: str) -> None:
    """Also record a method plugin's own top-level package."""
    _EXTRA_TOPS.add(top)


def stop() -> None:
    """Stop recording (tests); what was seen is kept."""
    with _LOCK:
        if sys.gettrace() is _trace:
            sys.settrace(None)
        _STATE["active"] = False


# ---- digests of the source on disk -----------------------------------------------------------
def _digest(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node, include_attributes=False).encode()).hexdigest()[:16]


def _is_def(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))


@functools.lru_cache(maxsize=None)
def _module_digests(path: Path, stamp: tuple[int, int]) -> tuple[str, dict[str, str]]:
    """(skeleton digest, {qualname: digest}) of the module at `path` (stamp: mtime and size, the cache key)."""
    tree = _strip_docstrings(ast.parse(path.read_bytes(), filename=str(path)))
    functions: dict[str, list[str]] = {}

    def strip(body: list, prefix: str) -> list:
        kept = []
        for node in body:
            if _is_def(node):
                functions.setdefault(prefix + node.name, []).append(_digest(node))
            elif isinstance(node, ast.ClassDef):
                node.body = strip(node.body, f"{prefix}{node.name}.") or [ast.Pass()]
                kept.append(node)
            else:
                kept.append(node)
        return kept

    tree.body = strip(tree.body, "")
    # a property and its setter share a name: one digest over both
    return _digest(tree), {name: "+".join(d) for name, d in functions.items()}


def digests_of(path: Path) -> tuple[str, dict[str, str]]:
    st = path.stat()
    return _module_digests(path, (st.st_mtime_ns, st.st_size))


# ---- what ran --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _roots(tops: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    return tuple((top, d.resolve()) for top in tops if (d := _package_dir(top)) is not None)


@functools.lru_cache(maxsize=None)
def _module_of(filename: str, tops: tuple[str, ...]) -> str | None:
    """The tracked, computing module a source file is (None: untracked or NOT_COMPUTING)."""
    if not filename.endswith(".py"):
        return None
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return None
    for top, root in _roots(tops):
        try:
            rel = path.relative_to(root.parent)
        except ValueError:
            continue
        parts = list(rel.with_suffix("").parts)
        if rel.suffix != ".py" or parts[0] != top:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        return None if _skipped(name) else name
    return None


def snapshot() -> dict[str, Any] | None:
    """{module: {"skeleton", "functions": {qualname: digest}}} of the tracked modules whose code ran in
    this process so far; None when that is not known (see `start`)."""
    if not recording():
        return None
    tops = tuple(sorted(set(TRACKED) | _EXTRA_TOPS))
    ran: dict[str, set[str]] = {}
    files: dict[str, str] = {}
    for code in list(_SEEN):
        module = _module_of(code.co_filename, tops)
        if module is None:
            continue
        files[module] = code.co_filename
        outer = code.co_qualname.split(".<locals>")[0]
        ran.setdefault(module, set()).add(outer)
    out = {}
    for module, names in sorted(ran.items()):
        path = Path(files[module])
        if path.stat().st_mtime_ns > _STATE["started_ns"]:
            return None  # edited while this process ran: the digest on disk may not be the code that ran
        skeleton, functions = digests_of(path)
        # qualnames that are not a def of the module (module / class bodies, module-level lambdas) are
        # covered by the skeleton
        out[module] = {"skeleton": skeleton,
                       "functions": {n: functions[n] for n in sorted(names) if n in functions}}
    return out


def merge(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """The union of two snapshots (None if either is None: unknown stays unknown)."""
    if a is None or b is None:
        return None
    out = {m: {"skeleton": v["skeleton"], "functions": dict(v["functions"])} for m, v in a.items()}
    for module, entry in b.items():
        mine = out.setdefault(module, {"skeleton": entry["skeleton"], "functions": {}})
        if mine["skeleton"] != entry["skeleton"]:
            return None  # two versions of one module: the state and the run saw different code
        for name, digest in entry["functions"].items():
            if mine["functions"].setdefault(name, digest) != digest:
                return None
    return out


def for_record(record: dict[str, Any], calib_info: dict[str, Any] | None) -> dict[str, Any] | None:
    """`code_executed` of a finished run: this process's snapshot, with the code of the process that
    computed its calibration when the state came from the cache."""
    executed = snapshot()
    if (record.get("metrics") or {}).get("calib_cached") == 1.0:
        executed = merge(executed, (calib_info or {}).get("code_executed"))
    return executed


def still_current(executed: dict[str, Any] | None) -> bool:
    """True when every module skeleton and function a record executed has the same digest on disk now."""
    if not executed:
        return False
    from harness.spec.code import module_path

    for module, entry in executed.items():
        path = module_path(module)
        if path is None:
            return False
        skeleton, functions = digests_of(path)
        if skeleton != entry.get("skeleton"):
            return False
        for name, digest in entry.get("functions", {}).items():
            if functions.get(name) != digest:
                return False
    return True
