"""Progress bars for long loops (matrix cells, calibration layers, evaluation windows).

`track(iterable, desc)` wraps an iterable in a tqdm bar on stderr. Bars show only on a terminal,
unless PTQBENCH_PROGRESS=1 (force on) or PTQBENCH_PROGRESS=0 (force off), so logs and tests stay clean.
Nested loops stack their bars; inner bars disappear when done.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    flag = os.environ.get("PTQBENCH_PROGRESS", "")
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", leave: bool = False, unit: str = "it"):
    """A manual tqdm bar (call .update(n), .set_postfix_str(s), .close())."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, unit=unit, disable=not enabled(), file=sys.stderr,
                dynamic_ncols=True)


def track(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False,
          unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar (a plain pass-through when bars are off)."""
    if not enabled():
        yield from iterable
        return
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    b = bar(total=total, desc=desc, leave=leave, unit=unit)
    try:
        for item in iterable:
            yield item
            b.update(1)
    finally:
        b.close()


def write(message: str) -> None:
    """Print a line without breaking the bars."""
    if enabled():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
