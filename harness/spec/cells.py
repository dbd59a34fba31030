"""What a spec expands into: cells (model, method + params, scheme, calib, seed) with their tasks.

Cells travel to executor workers (Ray pickles them), so they hold plain data, the scheme object and
the method's validated `Params`, never a model or a method instance.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from harness.spec.hashing import canon
from harness.spec.schema import DEFAULT_THREADS, NOT_HASHED

if TYPE_CHECKING:
    from harness.method import MethodParams


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "ppl" | "lm_eval" | "kl" | "greedy" | "routing"
    settings: dict[str, Any]

    @property
    def protocol(self) -> dict[str, Any]:
        """The settings that change the number (hashed into the run id)."""
        skip = NOT_HASHED.get(self.kind, set())
        return {k: v for k, v in self.settings.items() if k not in skip}


@dataclass
class Cell:
    """One (model, method + params, scheme, calib, seed) with its tasks and their run ids."""

    spec_name: str
    model: str
    revision: str | None
    model_source: dict[str, Any]
    method: str
    method_label: str
    params: MethodParams  # validated once, when the spec is expanded; the method is built from it
    method_version: int
    method_module: str  # where the method class is defined: its code (and the engine's) is hashed into the ids
    scheme_name: str | None
    scheme: Any
    scheme_config: dict[str, Any] | None
    calib: dict[str, Any]
    seed: int | None  # None: the method draws no random numbers (the runner still seeds with 0)
    dtype: str
    device: str
    tasks: list[TaskSpec]
    run_ids: dict[str, str] = field(default_factory=dict)  # task name -> run id
    calib_key: str = ""
    scale: str | None = None
    resources: dict[str, float] = field(default_factory=dict)  # scheduler request; never hashed
    threads: int = DEFAULT_THREADS  # torch intra-op threads while the cell runs (hashed when not the default)

    @property
    def method_params(self) -> dict[str, Any]:
        """The params as JSON (every field, defaults included): hashed into run ids, written to records."""
        return self.params.model_dump(mode="json")

    @property
    def key(self) -> tuple:
        return (self.model, self.revision, self.method, canon(self.method_params), self.scheme_name,
                canon(self.scheme_config), canon(self.calib), self.seed)

    def with_tasks(self, names: set[str]) -> Cell:
        return replace(self, tasks=[t for t in self.tasks if t.name in names],
                       run_ids={k: v for k, v in self.run_ids.items() if k in names})

    def describe(self) -> str:
        scheme = self.scheme_name or "-"
        return f"{self.model} | {self.method_label} | {scheme} | seed {self.seed}"
