"""Re-create a recorded run's quantized model: the same model, method, params, scheme and calibration.

The run's record holds everything that went into its number. The calibration state comes from the store's
cache when it is there (no recalibration); otherwise it is computed again (and cached), which for a
method that draws random numbers is reproducible only because the record's seed is set first.

A record's `code` is the hash of the source that computed it (harness.spec.code): if the method's or the
engine's code has changed since, the rebuilt model is not what was measured, and the rebuild refuses
unless told otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.errors import PtqbenchError
from harness.method import CalibConfig, CalibContext
from harness.registry import get_method
from harness.spec.cells import Cell
from harness.spec.code import method_code_hash
from harness.spec.hashing import calib_key
from harness.spec.schema import DEFAULT_THREADS
from harness.store import Store


class RebuildError(PtqbenchError):
    pass


@dataclass
class Rebuilt:
    model: torch.nn.Module
    tokenizer: Any
    adapter: Any
    cell: Cell
    calibration: str  # "cache", "computed" or "none"


def scheme_from_record(config: dict[str, Any] | None):
    """The QuantScheme a record's `scheme_config` (QuantScheme.to_dict) describes, checked to round-trip."""
    from harness.formats import Format
    from harness.quant import QuantScheme

    if not config:
        return None
    formats = {role: Format(**config[role]) if config.get(role) else None for role in ("weight", "activation", "kv")}
    also = set(config.get("also_quantized") or [])
    scheme = QuantScheme(config["name"], **formats, lm_head="lm_head" in also, embeddings="embeddings" in also)
    if scheme.to_dict() != config:
        raise RebuildError(f"scheme {config['name']!r}: the recorded config does not round-trip through QuantScheme")
    return scheme


def cell_from_record(record: dict[str, Any], device: str | None = None) -> Cell:
    """The record's cell (no tasks): method params validated again by the method's current Params."""
    method_cls = get_method(record["method"])
    if int(method_cls.version) != int(record["method_version"]):
        raise RebuildError(f"run {record['run_id']}: method {record['method']!r} is at version {method_cls.version}, "
                           f"the run used version {record['method_version']}")
    config = record.get("scheme_config")
    scheme = scheme_from_record(config)
    return Cell(
        spec_name=record["spec"], model=record["model"], revision=record.get("revision"),
        model_source=record.get("model_source") or {}, method=record["method"],
        method_label=record.get("method_label") or record["method"],
        params=method_cls.validate_params(record.get("method_params") or {}),
        method_version=int(method_cls.version), method_module=method_cls.__module__,
        scheme_name=record.get("scheme"), scheme=scheme, scheme_config=config, calib=record.get("calib") or {},
        seed=record.get("seed"), dtype=record["dtype"], device=device or record.get("device") or "cpu", tasks=[],
        calib_key=record.get("calib_key") or "", scale=record.get("scale"),
        threads=(record.get("protocol") or {}).get("threads", DEFAULT_THREADS),
    )


def check_code(record: dict[str, Any], cell: Cell) -> str | None:
    """None when the current code is the code that computed the record; else why not, in one line."""
    now = method_code_hash(cell.method_module)
    if record.get("code") and record["code"] != now:
        return (f"run {record['run_id']} was computed by other code (code hash {record['code']}, now {now}): "
                f"rerun it with the current code first, or pass --allow-code-change")
    return None


def rebuild(record: dict[str, Any], store: Store, *, device: str | None = None,
            allow_code_change: bool = False) -> Rebuilt:
    """The run's model after calibrate + apply, exactly as the runner built it before evaluating."""
    cell = cell_from_record(record, device)
    problem = check_code(record, cell)
    if problem and not allow_code_change:
        raise RebuildError(problem)
    method = get_method(cell.method)(cell.params)
    if method.needs_calibration:
        expected = calib_key(cell, method.calib_scheme_key(cell.scheme))
        if cell.calib_key and expected != cell.calib_key and not allow_code_change:
            raise RebuildError(f"run {record['run_id']}: its calibration key {cell.calib_key} is not what this "
                               f"code computes ({expected}); pass --allow-code-change to rebuild anyway")
        cell.calib_key = expected
    previous = torch.get_num_threads()
    torch.set_num_threads(cell.threads)  # as the runner: CPU numbers depend on the thread count
    try:
        return _build(method, cell, store)
    finally:
        torch.set_num_threads(previous)


def _build(method, cell: Cell, store: Store) -> Rebuilt:
    from harness import runner  # the runner's own steps, so the rebuild cannot drift from what ran

    runner.set_seed(cell.seed)
    model, tokenizer, adapter = runner.default_loader(cell)
    model.eval()
    calibration = "none"
    if method.needs_calibration:
        calibration = "cache" if store.has_calib(cell.calib_key) else "computed"
    ctx = CalibContext(model=model, tokenizer=tokenizer, adapter=adapter, scheme=runner.calib_scheme(cell),
                       calib=CalibConfig(**cell.calib) if cell.calib else CalibConfig(), seed=cell.seed or 0,
                       device=cell.device)
    runner.set_seed(cell.seed)
    with torch.no_grad():
        state = runner._calibrate(method, ctx, cell, store, runner._CellState())
        model = method.apply(model, adapter, state, cell.scheme)
    model.eval()
    return Rebuilt(model, tokenizer, adapter, cell, calibration)
