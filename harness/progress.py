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


#: Set by the CLI: announce every stage of every cell (load, calibrate, apply, eval) on stderr, so a long
#: step is never silent; a bar shows it as its postfix on a terminal, a log gets one line per stage.
announce_stages = False
_STAGE_BAR = None
_CELLS = {"started": 0, "total": 0}


def set_stage_bar(b, cells: int = 0) -> None:
    """The bar whose postfix shows the current stage (the driver's matrix bar) and the matrix's cell count;
    None to detach."""
    global _STAGE_BAR
    _STAGE_BAR = b
    _CELLS.update(started=0, total=cells)


def stage(where: str, what: str, new_cell: bool = False) -> None:
    """`where` (a cell) enters stage `what`; `new_cell` for its first stage (counts cell k of N)."""
    if new_cell:
        _CELLS["started"] += 1
    if not announce_stages:
        return
    count = f"cell {_CELLS['started']}/{_CELLS['total']} " if _CELLS["total"] else ""
    if enabled() and _STAGE_BAR is not None:
        _STAGE_BAR.set_postfix_str(f"{count}{where}: {what}")
    else:
        write(f"  [{count.strip()}] {where}: {what}" if count else f"  {where}: {what}")


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60:02d}:{seconds % 60:02d}"


def write(message: str) -> None:
    """Print a line without breaking the bars."""
    if enabled():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
