"""Plumbing share of method files: how many code lines are not the paper's algorithm.

    python benchmarks/plumbing_share.py [--rev GIT_REV] methods/flatquant.py methods/awq.py ...

Counts code lines (not blank, not comments, not docstrings) and, of those, plumbing lines by a fixed rule:
imports; registration and class boilerplate (decorators, `version`/`state_type`/`conformance_params`, the
fields of a Params class); state packing (State construction, `meta[...]`, `.tensors`, string-keyed
tensor dicts); wrapping and hooks (`wrap_*`, `register_forward*`, handle removal, `replace_site`, attribute
names of the model); and execution plumbing (devices, dtypes, progress bars, memory meters, deep copies,
grad modes). The rule is a heuristic, the same for every file and revision, so before/after compare.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess

PLUMBING = re.compile("|".join([
    r"^\s*(from|import)\s", r"^\s*@", r"^\s*(version|state_type|conformance_params|needs_calibration|uses_seed|uses_scheme)\s*=",
    r"\bState\(", r"\bmeta\[", r"\.tensors\b", r"to_tensors|from_tensors", r"\"(w|rot|aff|clip|lwc|scale|ost)\.\"",
    r"f\"(clip|lwc|scale|aff|ost|w)\.", r"\bwrap_(linear|experts|site|layer)\b", r"register_forward", r"\bhandles?\b",
    r"\.remove\(\)", r"replace_site", r"_proj\b", r"\.to\(device|\.to\(\"cpu\"\)|\.cpu\(\)", r"\bprogress\b",
    r"MemoryMeter|page_in|deepcopy", r"no_grad|enable_grad", r"\bdevice\s*=",
]))


def code_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of the code lines: docstrings, comments and blank lines left out."""
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                    and isinstance(first.value.value, str):
                doc_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = source.splitlines()
    return [(i, t) for i, t in enumerate(lines, 1) if t.strip() and not t.strip().startswith("#") and i not in doc_lines]


def params_lines(source: str) -> set[int]:
    """Lines inside the body of a `class ...Params(...)` (hyper-parameter boilerplate)."""
    out: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Params"):
            out.update(range(node.lineno, node.end_lineno + 1))
    return out


def import_lines(source: str) -> set[int]:
    out: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(range(node.lineno, node.end_lineno + 1))
    return out


def share(source: str) -> tuple[int, int, int]:
    lines = code_lines(source)
    boiler = params_lines(source) | import_lines(source)
    plumbing = [i for i, t in lines if i in boiler or PLUMBING.search(t)]
    return len(source.splitlines()), len(lines), len(plumbing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="read the files at this git revision")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    print(f"{'file':28} {'lines':>6} {'code':>6} {'plumbing':>9} {'share':>6}")
    for path in args.files:
        source = (subprocess.run(["git", "show", f"{args.rev}:{path}"], capture_output=True, text=True,
                                 check=True).stdout if args.rev else open(path).read())
        total, code, plumbing = share(source)
        print(f"{path:28} {total:6d} {code:6d} {plumbing:9d} {plumbing / max(code, 1):6.0%}")


if __name__ == "__main__":
    main()
