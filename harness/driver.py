"""The driver: decide which runs of a matrix are pending, hand them to an executor, write each record.

Only the driver writes the store (and, through `on_record`, W&B), so executors may run cells anywhere.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from harness import progress
from harness.executors import Executor, get_executor
from harness.spec import Cell, library_versions
from harness.store import DONE, FAILED, Store, is_diverged


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    diverged: int = 0  # of the failed ones: measured but above harness.runner.DIVERGED_PPL
    failures: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Failed runs that did not produce a number (crashes, NaN, OOM...)."""
        return self.failed - self.diverged


def plan(cells: Iterable[Cell], store: Store, retry_failed: bool = True) -> tuple[list[Cell], int]:
    """Cells reduced to their tasks that still need running; and how many runs were skipped.

    Done and diverged runs are always skipped. Other failed runs are retried by default (a failure can
    be transient: out of memory, a killed worker); `retry_failed=False` skips them too.
    """
    todo, skipped = [], 0
    for cell in cells:
        keep = set()
        for task in cell.tasks:
            record = store.get(cell.run_ids[task.name])
            status = record.get("status") if record else None
            if status == DONE or is_diverged(record) or (status == FAILED and not retry_failed):
                skipped += 1
            else:
                keep.add(task.name)
        if keep:
            todo.append(cell.with_tasks(keep))
    return todo, skipped


def run_matrix(cells: list[Cell], store: Store | None = None, executor: str | Executor = "local",
               retry_failed: bool = True, on_record: Callable[[dict], None] | None = None) -> Summary:
    """Run every pending (cell, task), write each record as it arrives, and summarise."""
    store = store or Store()
    todo, skipped = plan(cells, store, retry_failed)
    summary = Summary(total=sum(len(c.tasks) for c in cells), skipped=skipped)
    ex = get_executor(executor) if isinstance(executor, str) else executor
    # Versions are read once here so every record of this invocation reports the same ones.
    library_versions()
    bar = progress.bar(total=sum(len(c.tasks) for c in todo), desc="matrix", leave=True, unit="run")
    try:
        for record in ex.run(todo, store.root):
            store.write(record)
            if record["status"] == DONE:
                summary.done += 1
            else:
                summary.failed += 1
                summary.diverged += is_diverged(record)
                summary.failures.append(f"{record['run_id']} {record['model']} {record['method_label']} "
                                        f"{record['scheme'] or '-'} {record['task']}: {record['error']}")
            bar.update(1)
            bar.set_postfix_str(f"{record['method_label']} {record['scheme'] or '-'} {record['task']}")
            if on_record:
                on_record(record)
    finally:
        bar.close()
    return summary
