"""The `local` executor: cells one after another in this process (tests, debugging, one machine)."""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from harness import fingerprint, runner
from harness.executors import Executor, register_executor
from harness.spec import Cell
from harness.store import Store


class ReusingLoader:
    """Loads each model once and hands every cell a deep copy of the pristine model.

    Loading (e.g. de-quantizing a GGUF file) can cost more than a smoke cell's evaluation. Only the
    last model is kept, and only when it is smaller than `max_mb` (default $PTQBENCH_MODEL_CACHE_MB
    or 4096): big models are loaded fresh for every cell instead of being held twice in memory.
    """

    def __init__(self, loader: Callable[[Cell], tuple] | None = None, max_mb: float | None = None):
        self.loader = loader
        self.max_mb = float(os.environ.get("PTQBENCH_MODEL_CACHE_MB", 4096)) if max_mb is None else max_mb
        self._key: tuple | None = None
        self._pristine: tuple | None = None

    def __call__(self, cell: Cell) -> tuple:
        key = (cell.model, cell.revision, cell.dtype, cell.device)
        if self._key == key and self._pristine is not None:
            model, tokenizer, adapter = self._pristine
            model_copy, adapter_copy = copy.deepcopy((model, adapter))  # one memo: adapter refs stay consistent
            return model_copy, tokenizer, adapter_copy
        self._key = self._pristine = None
        model, tokenizer, adapter = (self.loader or runner.default_loader)(cell)
        size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 \
            if isinstance(model, torch.nn.Module) else float("inf")
        if size_mb <= self.max_mb:
            self._key = key
            self._pristine = (model, tokenizer, adapter)
            model, adapter = copy.deepcopy((model, adapter))
        return model, tokenizer, adapter


@register_executor("local")
class LocalExecutor(Executor):
    """In this process, one cell after another."""

    def __init__(self, model_loader: Callable | None = None, evaluators: dict | None = None,
                 reuse_models: bool = True):
        self.model_loader, self.evaluators, self.reuse_models = model_loader, evaluators, reuse_models

    def run(self, cells: list[Cell], store_root: Path) -> Iterator[dict[str, Any]]:
        store = Store(store_root)
        loader = ReusingLoader(self.model_loader) if self.reuse_models else self.model_loader
        for cell in cells:
            fingerprint.track_package(cell.method_module.split(".")[0])
            for record in runner.run_cell(cell, store, model_loader=loader, evaluators=self.evaluators):
                # what this process executed (None unless recording: harness.fingerprint)
                record["code_executed"] = fingerprint.for_record(record, store.calib_info(record["calib_key"])
                                                                 if record.get("calib_key") else None)
                yield record
