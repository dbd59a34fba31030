"""The driver: decide which runs of a matrix are pending, hand them to an executor, write each record.

Only the driver writes the store (and, through `on_record`, W&B), so executors may run cells anywhere.
Several drivers may share one results directory: each run is claimed (harness.claims) when the executor
draws its cell, so every run is computed once, by whichever driver gets to it first.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

from harness import fingerprint, progress, runner
from harness.claims import Claim
from harness.executors import Executor, get_executor
from harness.spec import Cell, library_versions
from harness.spec.code import method_code_hash
from harness.spec.hashing import run_identity
from harness.store import DONE, FAILED, Store, is_diverged


@dataclass
class Summary:
    total: int = 0
    skipped: int = 0  # already recorded, or computed by another driver meanwhile
    done: int = 0
    failed: int = 0
    diverged: int = 0  # of the failed ones: measured but above harness.runner.DIVERGED_PPL
    elsewhere: int = 0  # of the skipped ones: claimed by another driver on the same results directory
    adopted: int = 0  # of the skipped ones: an older record whose executed code is unchanged (harness.fingerprint)
    failures: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Failed runs that did not produce a number (crashes, NaN, OOM...)."""
        return self.failed - self.diverged


def _settled(record: dict | None, retry_failed: bool) -> bool:
    """Nothing left to compute: done, diverged, or failed with retries off."""
    if not record:
        return False
    status = record.get("status")
    return status == DONE or is_diverged(record) or (status == FAILED and not retry_failed)


class Adopter:
    """Finds, for a run id without a record, a record of the same run (same identity, older code) whose
    executed code is unchanged on disk (harness.fingerprint.still_current), and copies it under the
    new id with `adopted_from`. The store is scanned once, on the first miss."""

    def __init__(self, store: Store):
        self.store = store
        self._by_identity: dict[str, list[dict]] | None = None

    def _index(self) -> dict[str, list[dict]]:
        if self._by_identity is None:
            self._by_identity = {}
            for record in self.store.records():
                if record.get("identity") and record.get("code_executed") and _settled(record, retry_failed=True):
                    self._by_identity.setdefault(record["identity"], []).append(record)
        return self._by_identity

    def adopt(self, run_id: str, identity: str, code: str) -> dict | None:
        candidates = sorted(self._index().get(identity, []), key=lambda r: str(r.get("created_at")), reverse=True)
        for old in candidates:
            if old["run_id"] != run_id and fingerprint.still_current(old["code_executed"]):
                record = {**old, "run_id": run_id, "adopted_from": old["run_id"],
                          "computed_as": old.get("computed_as") or old["run_id"], "code": code,
                          "adopted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                self.store.write(record)
                return record
        return None


def _plan(cells: Iterable[Cell], store: Store, retry_failed: bool,
          adopter: Adopter | None = None) -> tuple[list[Cell], int, dict[str, dict | None], int]:
    todo, skipped, seen, adopted = [], 0, {}, 0
    for cell in cells:
        keep = set()
        for task in cell.tasks:
            rid = cell.run_ids[task.name]
            record = store.get(rid)
            if not _settled(record, retry_failed) and adopter is not None:
                record = adopter.adopt(rid, run_identity(cell, task), method_code_hash(cell.method_module)) or record
                adopted += bool(record and record.get("adopted_from"))
            if _settled(record, retry_failed):
                skipped += 1
            else:
                keep.add(task.name)
                seen[rid] = record
        if keep:
            todo.append(cell.with_tasks(keep))
    return todo, skipped, seen, adopted


def plan(cells: Iterable[Cell], store: Store, retry_failed: bool = True) -> tuple[list[Cell], int]:
    """Cells reduced to their tasks that still need running; and how many runs were skipped.

    Done and diverged runs are always skipped. Other failed runs are retried by default (a failure can
    be transient: out of memory, a killed worker); `retry_failed=False` skips them too.
    """
    todo, skipped, _, _ = _plan(cells, store, retry_failed)
    return todo, skipped


class _Claims:
    """The runs this driver holds; cells are claimed as the executor draws them (lazily)."""

    def __init__(self, store: Store, summary: Summary, seen: dict[str, dict | None]):
        self.store, self.summary = store, summary
        self.seen = seen  # run id -> its record when planned (None: no record)
        self.held: dict[str, Claim] = {}

    def cells(self, todo: list[Cell]) -> Iterator[Cell]:
        for cell in todo:
            keep = set()
            for task in cell.tasks:
                rid = cell.run_ids[task.name]
                claim = self.store.claim("run", rid)
                if not claim.try_acquire():
                    self.summary.skipped += 1
                    self.summary.elsewhere += 1
                elif self._written_since_planned(rid):  # another driver ran it after we planned
                    claim.release()
                    self.summary.skipped += 1
                else:
                    self.held[rid] = claim
                    keep.add(task.name)
            if keep:
                yield cell.with_tasks(keep)

    def _written_since_planned(self, run_id: str) -> bool:
        return self.store.get(run_id) != self.seen.get(run_id)

    def release(self, run_id: str | None = None) -> None:
        for rid in [run_id] if run_id is not None else list(self.held):
            claim = self.held.pop(rid, None)
            if claim is not None:
                claim.release()


def run_matrix(cells: list[Cell], store: Store | None = None, executor: str | Executor = "local",
               retry_failed: bool = True, on_record: Callable[[dict], None] | None = None,
               check_data: bool = True, adopt: bool = True) -> Summary:
    """Run every pending (cell, task), write each record as it arrives, and summarise. `adopt`: reuse an
    older record of a run whose executed code did not change (see `Adopter`) instead of recomputing it."""
    store = store or Store()
    identities = {c.run_ids[t.name]: run_identity(c, t) for c in cells for t in c.tasks}
    todo, skipped, seen, adopted = _plan(cells, store, retry_failed, Adopter(store) if adopt else None)
    summary = Summary(total=sum(len(c.tasks) for c in cells), skipped=skipped, adopted=adopted)
    ex = get_executor(executor) if isinstance(executor, str) else executor
    # Versions are read once here so every record of this invocation reports the same ones.
    library_versions()
    if todo:
        store.open_for_writing()
        if getattr(ex, "local_data", True) and check_data:
            runner.check_data(todo)  # a missing dataset stops the matrix here, in one line, not in every cell
    claims = _Claims(store, summary, seen)
    bar = progress.bar(total=sum(len(c.tasks) for c in todo), desc="matrix", leave=True, unit="run")
    progress.set_stage_bar(bar, cells=len(todo))
    records = ex.run(claims.cells(todo), store.root)
    try:
        for record in records:
            record.setdefault("identity", identities.get(record["run_id"]))
            store.write(record)
            claims.release(record["run_id"])
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
        progress.set_stage_bar(None)
        bar.close()
        # an interrupted matrix closes the executor's generator now, not at garbage collection
        # (the Ray executor shuts down the cluster it started)
        getattr(records, "close", lambda: None)()
        claims.release()
    return summary
