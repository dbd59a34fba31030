"""Run one cell: load the model, calibrate (or load the cached state), apply once, evaluate every task.

Each (cell, task) gives one record. Anything that goes wrong (an exception, non-finite logits, a
diverged perplexity) becomes a failed record with a one-line reason, and the matrix goes on.
Where cells run is the executors' business (harness.executors); the matrix is the driver's (harness.driver).
"""
from __future__ import annotations

import gc
import math
import os
import platform
import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from harness import progress
from harness.calib import MemoryMeter
from harness.data import CALIB_CORPORA, EVAL_TEXTS, calib_source, check_available, eval_source
from harness.devices import check_device
from harness.errors import PtqbenchError
from harness.method import CalibConfig, CalibContext, Method, State
from harness.kv import kv_accounting
from harness.quant.scheme import QuantScheme, get_scheme
from harness.spec import Cell, TaskSpec, versions_for
from harness.spec.code import method_code_hash
from harness.store import DONE, FAILED, Store

#: A perplexity above this (or NaN/Inf) marks the run as diverged: failed, with the value in the reason.
DIVERGED_PPL = 1e4
SANITY_TEXT = "The quick brown fox jumps over the lazy dog. Quantization should not break a language model."


class RunFailure(PtqbenchError):
    """A run that produced no usable number (non-finite logits, diverged perplexity)."""


def one_line_error(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: the method called sys.exit({exc.code!r})"
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text[:1000]


def set_seed(seed: int | None) -> None:
    seed = 0 if seed is None else int(seed)
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------------
# measuring


def process_peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------------------------
# evaluators: kind -> fn(model, tokenizer, tasks, cell, refs) -> {task name: result}


def _eval_ppl(model, tokenizer, tasks: list[TaskSpec], cell: Cell, refs: dict) -> dict[str, Any]:
    from harness.eval import perplexity

    return {t.name: perplexity(model, tokenizer, t.name, seqlen=t.settings["seqlen"],
                               max_windows=t.settings["max_windows"], batch_size=t.settings.get("batch_size", 1),
                               progress=progress.enabled())
            for t in tasks}


def _eval_lm(model, tokenizer, tasks: list[TaskSpec], cell: Cell, refs: dict) -> dict[str, Any]:
    from harness.eval import lm_eval_tasks

    s = tasks[0].settings  # tasks arrive grouped by identical settings
    return lm_eval_tasks(model, tokenizer, [t.name for t in tasks], limit=s["limit"],
                         num_fewshot=s["num_fewshot"], batch_size=s["batch_size"], seed=cell.seed or 0)


def _eval_kl(model, tokenizer, tasks: list[TaskSpec], cell: Cell, refs: dict) -> dict[str, Any]:
    from harness.eval import kl_to_reference

    return {t.name: kl_to_reference(model, refs[t.name]) for t in tasks}


def _collect_kl_reference(model, tokenizer, task: TaskSpec, cell: Cell) -> Any:
    from harness.eval import collect_reference

    s = task.settings
    return collect_reference(model, tokenizer, s["dataset"], seqlen=s["seqlen"], max_windows=s["max_windows"],
                             topk=s["topk"])


def _eval_greedy(model, tokenizer, tasks: list[TaskSpec], cell: Cell, refs: dict) -> dict[str, Any]:
    from harness.eval.greedy import greedy_agreement

    return {t.name: greedy_agreement(model, refs[t.name]) for t in tasks}


def _collect_greedy_reference(model, tokenizer, task: TaskSpec, cell: Cell) -> Any:
    from harness.eval.greedy import collect_greedy_reference

    s = task.settings
    return collect_greedy_reference(model, tokenizer, s["dataset"], s["prompt_len"], s["new_tokens"], s["prompts"])


def _eval_routing(model, tokenizer, tasks: list[TaskSpec], cell: Cell, refs: dict) -> dict[str, Any]:
    from harness.eval.routing import routing_fidelity

    return {t.name: routing_fidelity(model, refs[t.name]) for t in tasks}


def _collect_routing_reference(model, tokenizer, task: TaskSpec, cell: Cell) -> Any:
    from harness.eval.routing import collect_routing_reference

    s = task.settings
    calib = cell.calib if cell.calib.get("corpus") in CALIB_CORPORA else None
    return collect_routing_reference(model, tokenizer, s["dataset"], s["seqlen"], s["windows"], calib, cell.seed or 0)


EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {"ppl": _eval_ppl, "lm_eval": _eval_lm, "kl": _eval_kl,
                                                         "greedy": _eval_greedy, "routing": _eval_routing}


def _lm_eval_source(task: TaskSpec) -> tuple[str, str] | None:
    from harness.eval.lm_tasks import TASKS

    return (TASKS[task.name].dataset, TASKS[task.name].split) if task.name in TASKS else None


def _text_source(name: str) -> tuple[str, str] | None:
    return eval_source(name) if name in EVAL_TEXTS else None


#: kind -> the (dataset, split) a task of that kind reads, None for a name only a custom evaluator knows
#: (checked before a matrix starts: check_data)
DATA_SOURCES: dict[str, Callable[[TaskSpec], tuple[str, str] | None]] = {
    "ppl": lambda task: _text_source(task.name),
    "lm_eval": _lm_eval_source,
    "kl": lambda task: _text_source(task.settings.get("dataset", "")),
    "greedy": lambda task: _text_source(task.settings.get("dataset", "")),
    "routing": lambda task: _text_source(task.settings.get("dataset", "")),
}


def check_data(cells: list[Cell]) -> None:
    """One line, before any work, when a dataset the cells read (tasks and calibration) is unavailable."""
    needs = {calib_source(cell.calib["corpus"]) for cell in cells if cell.calib.get("corpus") in CALIB_CORPORA}
    needs |= {DATA_SOURCES[task.kind](task) for cell in cells for task in cell.tasks if task.kind in DATA_SOURCES}
    check_available(needs - {None})
REFERENCE_COLLECTORS: dict[str, Callable[..., Any]] = {"kl": _collect_kl_reference, "greedy": _collect_greedy_reference,
                                                       "routing": _collect_routing_reference}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _result_fields(result: Any) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """(metrics, protocol, info) from an EvalResult-like object or a plain dict of numbers.

    The main value and every numeric `extra` become metrics; other extras go to `info`.
    """
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if _is_number(v)}, {}, {}
    metrics = {str(result.metric): result.value}
    protocol = dict(getattr(result, "protocol", None) or {})
    info = {}
    for k, v in (getattr(result, "extra", None) or {}).items():
        if _is_number(v):
            metrics[str(k)] = v
        else:
            info[str(k)] = v
    return metrics, protocol, info


def check_result(task: TaskSpec, metrics: dict[str, float]) -> None:
    """Raise RunFailure for a number that cannot be used (NaN/Inf anywhere, a diverged perplexity)."""
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RunFailure(f"non-finite {name}={value} on {task.name}")
    ppl = metrics.get("ppl", metrics.get("perplexity"))
    if ppl is not None and ppl > DIVERGED_PPL:
        raise RunFailure(f"diverged: ppl={ppl:.4g} on {task.name} exceeds {DIVERGED_PPL:g}")


def sanity_forward(model: torch.nn.Module, tokenizer: Any, device: str) -> None:
    """One short forward pass: a model that already gives NaN/Inf logits fails before the evaluation."""
    if tokenizer is None:
        return
    ids = tokenizer(SANITY_TEXT, return_tensors="pt")["input_ids"][:, :64].to(device)
    with torch.no_grad():
        logits = model(ids).logits
    bad = (~torch.isfinite(logits)).sum().item()
    if bad:
        raise RunFailure(f"non-finite logits after apply ({bad} of {logits.numel()} values are NaN/Inf)")


# ----------------------------------------------------------------------------------------------
# one cell


def kv_cache_cost(model: Any, cell: Cell, task: TaskSpec) -> dict[str, Any] | None:
    """The KV cache this run stores, at the task's sequence length (harness.kv.kv_accounting)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(getattr(config, "text_config", None) or config, "num_hidden_layers"):
        return None
    return kv_accounting(installed_kv(model), config, int(task.settings.get("seqlen") or 2048),
                         installed_kv_codecs(model))


def installed_kv(model: Any):
    """The KV format or policy the model's attention actually applies (a method such as SKVQ installs its
    own policy over the scheme's format); None when K/V stay full precision."""
    from harness.quant import kv_format

    for module in model.modules():
        if hasattr(module, "kv_policy") or hasattr(module, "kv_quantizer"):
            found = kv_format(module)
            if found is not None:
                return found
    return None


def installed_kv_codecs(model: Any) -> list[dict[str, Any]]:
    """Each KV-policy attention module's codecs (`kv_codecs`, set by a method), in module order."""
    return [getattr(m, "kv_codecs", None) or {} for m in model.modules() if getattr(m, "kv_policy", None) is not None]


def default_loader(cell: Cell):
    """The model, tokenizer and adapter of a cell, from the model registry."""
    from harness.models import load_model

    return load_model(cell.model, revision=cell.revision, dtype=getattr(torch, cell.dtype), device=cell.device)


def base_record(cell: Cell, task: TaskSpec) -> dict[str, Any]:
    return {
        "run_id": cell.run_ids[task.name], "spec": cell.spec_name, "scale": cell.scale,
        "model": cell.model, "revision": cell.revision, "model_source": cell.model_source,
        "method": cell.method, "method_label": cell.method_label, "method_params": cell.method_params,
        "method_version": cell.method_version, "scheme": cell.scheme_name, "scheme_config": cell.scheme_config,
        "calib": cell.calib, "calib_key": cell.calib_key, "seed": cell.seed, "dtype": cell.dtype,
        "device": cell.device, "task": task.name, "task_kind": task.kind,
        "protocol": {**task.protocol, "threads": cell.threads},
        "versions": versions_for(task.kind), "code": method_code_hash(cell.method_module), "host": platform.node(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class _CellState:
    metrics: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _load_cached(method: Method, cell: Cell, store: Store, out: _CellState) -> State:
    state = store.load_calib(cell.calib_key, method.state_type, device="cpu")
    info = state.meta.get("_ptqbench", {})
    out.metrics.update(info.get("metrics", {}))
    out.metrics["calib_cached"] = 1.0
    out.timings["calib_load_s"] = 0.0
    return state


def _calibrate(method: Method, ctx: CalibContext, cell: Cell, store: Store, out: _CellState) -> State:
    if not method.needs_calibration:
        return method.calibrate(ctx)
    if store.has_calib(cell.calib_key):
        return _load_cached(method, cell, store, out)
    # One process computes a calibration; another that needs it (a second driver, a Ray worker with
    # another scheme of the same calibration) waits for it and loads it.
    claim = store.claim("calib", cell.calib_key)
    claim.acquire(on_wait=lambda: progress.write(f"{cell.describe()}: waiting for another process computing "
                                                 f"this calibration ({claim.path})"))
    try:
        if store.has_calib(cell.calib_key):
            return _load_cached(method, cell, store, out)
        t0 = time.perf_counter()
        with MemoryMeter(cell.device) as mem:
            state = method.calibrate(ctx)
        elapsed = time.perf_counter() - t0
        if not isinstance(state, State):
            raise PtqbenchError(f"method {method.name!r}: calibrate must return a State, got {type(state).__name__}")
        calib_metrics = {"calib_seconds": round(elapsed, 3), **mem.metrics("calib")}
        if isinstance(state.meta.get("steps"), (int, float)):  # optimizer steps / grid points, as the method counts
            calib_metrics["calib_steps"] = float(state.meta["steps"])
        state.meta["_ptqbench"] = {"metrics": calib_metrics, "cell": cell.describe(), "created_at": _now()}
        store.save_calib(cell.calib_key, state)
    finally:
        claim.release()
    out.metrics.update(calib_metrics)
    out.metrics["calib_cached"] = 0.0
    return state


def calib_scheme(cell: Cell) -> QuantScheme:
    """The cell's scheme as calibration sees it: a QuantScheme always (16-bit when the method ignores schemes)."""
    if cell.scheme is None:
        return get_scheme("w16a16")
    return get_scheme(cell.scheme) if isinstance(cell.scheme, (str, dict)) else cell.scheme


def _group_tasks(tasks: list[TaskSpec]) -> list[list[TaskSpec]]:
    """lm-eval tasks with identical settings are evaluated in one call; everything else one by one."""
    groups: dict[Any, list[TaskSpec]] = {}
    order = []
    for t in tasks:
        key = ("lm_eval", tuple(sorted(t.settings.items()))) if t.kind == "lm_eval" else ("one", t.name)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(t)
    return [groups[k] for k in order]


def run_cell(cell: Cell, store: Store | str | os.PathLike | None = None, *,
             model_loader: Callable[[Cell], tuple] | None = None,
             evaluators: dict[str, Callable[..., dict[str, Any]]] | None = None) -> Iterator[dict[str, Any]]:
    """Run every task of one cell; yields one record (done or failed) per task, as soon as it exists.

    torch runs the cell with `cell.threads` intra-op threads whatever the executor or machine gave the
    process (CPU numbers depend on the thread count); the previous count is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(cell.threads)
    try:
        yield from _run_cell(cell, store, model_loader, evaluators)
    finally:
        torch.set_num_threads(previous)


def _run_cell(cell: Cell, store: Store | str | os.PathLike | None, model_loader: Callable[[Cell], tuple] | None,
              evaluators: dict[str, Callable[..., dict[str, Any]]] | None) -> Iterator[dict[str, Any]]:
    from harness.registry import get_method

    store = store if isinstance(store, Store) else Store(store)
    evaluators = {**EVALUATORS, **(evaluators or {})}
    loader = model_loader or default_loader
    state = _CellState()
    stage = "load"
    failure: BaseException | None = None
    model = tokenizer = ctx = method = None
    refs: dict[str, Any] = {}
    ref_errors: dict[str, BaseException] = {}
    try:
        set_seed(cell.seed)
        t0 = time.perf_counter()
        progress.stage(cell.describe(), "load model", new_cell=True)
        check_device(cell.device)  # one line where a worker lacks the device, not torch's error
        model, tokenizer, adapter = loader(cell)
        if hasattr(model, "eval"):
            model.eval()
        state.timings["load_s"] = round(time.perf_counter() - t0, 3)

        # FP references (for KL) come from the model before calibration; a failure here fails
        # only the tasks that need the reference.
        for task in cell.tasks:
            if task.kind in REFERENCE_COLLECTORS:
                try:
                    refs[task.name] = REFERENCE_COLLECTORS[task.kind](model, tokenizer, task, cell)
                except (Exception, SystemExit) as exc:  # noqa: BLE001
                    ref_errors[task.name] = exc

        stage = "calibrate"
        progress.stage(cell.describe(), "calibrate")
        method = get_method(cell.method)(cell.params)  # validated when the spec was expanded
        ctx = CalibContext(model=model, tokenizer=tokenizer, adapter=adapter, scheme=calib_scheme(cell),
                           calib=CalibConfig(**cell.calib) if cell.calib else CalibConfig(), seed=cell.seed or 0,
                           device=cell.device, progress=progress.track)
        set_seed(cell.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            calib_state = _calibrate(method, ctx, cell, store, state)
        state.timings["calibrate_s"] = round(time.perf_counter() - t0, 3)

        stage = "apply"
        progress.stage(cell.describe(), "apply")
        t0 = time.perf_counter()
        with torch.no_grad():
            model = method.apply(model, adapter, calib_state, cell.scheme)
            if hasattr(model, "eval"):
                model.eval()
            ctx.model = model
            sanity_forward(model, tokenizer, cell.device)
        state.timings["apply_s"] = round(time.perf_counter() - t0, 3)

        stage = "method metrics"
        state.metrics.update({f"method.{k}": v for k, v in (method.metrics(model, ctx) or {}).items()})
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - every failure becomes a record; a method's
        # sys.exit() too (a failed run with its reason, the matrix goes on); KeyboardInterrupt still stops it
        failure = exc

    if failure is not None:
        for task in cell.tasks:
            yield {**base_record(cell, task), "status": FAILED, "error": f"[{stage}] {one_line_error(failure)}",
                   "main_metric": None,
                   "metrics": dict(state.metrics), "timings": dict(state.timings), "created_at": _now()}
        _release(model)
        return

    for task in cell.tasks:
        if task.name in ref_errors:
            yield {**base_record(cell, task), "status": FAILED, "main_metric": None,
                   "error": f"[reference] {one_line_error(ref_errors[task.name])}",
                   "metrics": dict(state.metrics), "timings": dict(state.timings), "created_at": _now()}
    for group in _group_tasks([t for t in cell.tasks if t.name not in ref_errors]):
        t0 = time.perf_counter()
        results: dict[str, Any] = {}
        error: BaseException | None = None
        try:
            progress.stage(cell.describe(), f"evaluate {', '.join(t.name for t in group)}")
            set_seed(cell.seed)
            with torch.no_grad():
                results = evaluators[group[0].kind](model, tokenizer, group, cell, refs)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            error = exc
        eval_s = round((time.perf_counter() - t0) / len(group), 3)
        for task in group:
            record = {**base_record(cell, task), "timings": {**state.timings, "eval_s": eval_s}, "created_at": _now(),
                      "main_metric": None}
            metrics = dict(state.metrics)
            task_error = error
            if task_error is None:
                try:
                    if task.name not in results:
                        raise RunFailure(f"evaluator returned no result for {task.name}")
                    task_metrics, protocol, info = _result_fields(results[task.name])
                    record["protocol"].update(protocol)
                    if info:
                        record["info"] = info
                    check_result(task, task_metrics)
                    metrics.update(task_metrics)
                    record["main_metric"] = getattr(results[task.name], "metric", None) or next(iter(task_metrics), None)
                    record["kv_cache"] = kv_cache_cost(model, cell, task)
                except (Exception, SystemExit) as exc:  # noqa: BLE001
                    task_error = exc
                    if task.name in results:
                        metrics.update(_result_fields(results[task.name])[0])
            record["timings"]["process_peak_rss_mb"] = process_peak_rss_mb()
            record.update(metrics=metrics, status=FAILED if task_error else DONE,
                          error=f"[eval] {one_line_error(task_error)}" if task_error else None)
            yield record
    _release(model)


def _release(model: Any) -> None:
    # A full collection frees the model's reference cycles before the next cell loads; it costs
    # ~0.2 s, which only matters (and is skipped) for the tiny test models.
    big = sum(p.numel() for p in model.parameters()) > 10_000_000 if isinstance(model, torch.nn.Module) else True
    del model
    if big:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
