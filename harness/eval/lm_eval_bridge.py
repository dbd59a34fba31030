"""lm-evaluation-harness as a library, on the in-memory (quantized) model.

HFLM wraps the model object itself (no reload), `simple_evaluate` runs the tasks. With
PTQBENCH_DATA_DIR set, tasks come from `harness.eval.lm_tasks` rendered against the mirror;
without it, lm-eval's stock hub tasks are used (indexing only their folders, not all 14k tasks).

Metric policy (QuaRot/FlatQuant): the headline value is acc_norm where the task reports it, else
acc; both (and lambada's perplexity) are kept in `extra`, and acc / acc_norm per document too
(`extra.example_scores`, document order) for paired intervals between runs on the same documents.
lm-eval's request cache (`use_cache`) is keyed on the request only, never on the model, so a cache
must belong to one run: pass a per-run `cache_path` (or None for no cache).
"""
from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from harness.data import DatasetMissingError, data_dir, mirror_path
from harness.data.sources import source
from harness.errors import InvalidValueError, UnknownNameError
from harness.eval.lm_tasks import TASKS, lm_eval_tasks_dir, mirror_config
from harness.eval.result import EvalResult, NonFiniteError, library_versions, model_device, model_dtype

METRIC_POLICY = "acc_norm where the task reports it, else acc (QuaRot/FlatQuant); both in extra"
#: metrics that are a mean over documents, kept per document too
MEAN_METRICS = ("acc", "acc_norm")


def list_tasks() -> list[str]:
    """Names of the lm-eval tasks this harness knows."""
    return sorted(TASKS)


def task_kinds() -> dict[str, str]:
    """Every evaluation name -> kind ("ppl" for perplexity corpora, "lm_eval" for tasks)."""
    from harness.data import EVAL_TEXTS

    return {**{name: "ppl" for name in EVAL_TEXTS}, **{name: "lm_eval" for name in TASKS}}


def _check_tasks(tasks: list[str]) -> None:
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise InvalidValueError("tasks", tasks, f"a non-empty list of: {', '.join(list_tasks())}")
    for name in tasks:
        if name not in TASKS:
            raise UnknownNameError("lm-eval task", name, list_tasks())


def _render_mirror_tasks(tasks: list[str], directory: Path) -> dict[str, dict[str, Any]]:
    import yaml

    info = {}
    for name in tasks:
        task = TASKS[name]
        path = mirror_path(task.dataset, task.split)
        cfg = mirror_config(task, path)
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        rel = source(task.dataset, task.split).mirror
        shown = dict(cfg, dataset_kwargs={"data_files": {task.split: f"$PTQBENCH_DATA_DIR/{rel}"}})
        if "include" in shown:  # record the stock config relative to the lm-eval package
            shown["include"] = f"lm_eval/tasks/{task.stock_yaml}"
        info[name] = {"source": "mirror", "data_file": rel, "split": task.split, "config": shown}
        note = source(task.dataset, task.split).note
        if note:
            info[name]["note"] = note
    return info


@contextlib.contextmanager
def _preserved_rng_and_quiet_logs():
    """simple_evaluate seeds the global python/numpy/torch RNGs; give the caller its state back."""
    import numpy as np

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def example_scores(samples: list[dict[str, Any]], metric: str) -> list[float]:
    """The per-document values of `metric`, in document order (what a paired bootstrap resamples)."""
    scored = sorted((int(ex["doc_id"]), _number(ex.get(metric))) for ex in samples)
    if any(v is None for _, v in scored):
        raise NonFiniteError(f"lm-eval returned a document without a numeric {metric}")
    return [v for _, v in scored]


def lm_eval_tasks(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                  cache_path: str | Path | None = None, seed: int = 0, num_fewshot: int = 0
                  ) -> dict[str, EvalResult]:
    """Run lm-eval tasks on the in-memory model; one EvalResult per task (value per METRIC_POLICY)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    _check_tasks(tasks)
    if limit is not None and limit < 1:
        raise InvalidValueError("limit", limit, "a positive integer or None")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="ptqbench_lm_tasks_") as tmp, _preserved_rng_and_quiet_logs():
        if data_dir() is not None:
            sources = _render_mirror_tasks(tasks, Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)
        else:
            stock = lm_eval_tasks_dir()
            dirs = sorted({str(stock / TASKS[t].stock_dir) for t in tasks})
            manager = TaskManager(include_path=dirs, include_defaults=False)
            sources = {t: {"source": "hub", "config": f"lm_eval/tasks/{TASKS[t].stock_dir} (stock)"} for t in tasks}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        start = time.perf_counter()
        try:
            out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                                  limit=limit, use_cache=str(cache_path) if cache_path is not None else None,
                                  cache_requests=False, bootstrap_iters=0, log_samples=True, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except (ConnectionError, FileNotFoundError) as exc:
            if data_dir() is not None:
                raise
            msg = " ".join(str(exc).split())[:300]
            raise DatasetMissingError(f"lm-eval tasks {', '.join(tasks)}: PTQBENCH_DATA_DIR is not set and the "
                                      f"hub datasets could not be loaded: {type(exc).__name__}: {msg}") from None
        seconds = time.perf_counter() - start
    versions = library_versions()
    results: dict[str, EvalResult] = {}
    for name in tasks:
        raw = out["results"][name]
        metrics = {key.split(",")[0]: _number(v) for key, v in raw.items()
                   if "," in key and "_stderr" not in key and _number(v) is not None}
        metric = "acc_norm" if "acc_norm" in metrics else "acc"
        if metric not in metrics:
            raise NonFiniteError(f"lm-eval task {name} returned no {metric}: {sorted(metrics)}")
        n = out.get("n-samples", {}).get(name, {})
        task = TASKS[name]
        protocol = {
            "kind": "lm_eval", "task": name, "dataset": task.dataset, "split": task.split, **sources[name],
            "prompt": task.prompt, "metric": metric, "metric_policy": METRIC_POLICY, "num_fewshot": num_fewshot,
            "fewshot_split": task.split if num_fewshot else None, "limit": limit,
            "docs_total": n.get("original"), "docs_evaluated": n.get("effective"), "batch_size": batch_size,
            "seed": seed, "dtype": model_dtype(model), "device": str(model_device(model)),
            "add_bos_token": "tokenizer default (HFLM add_bos_token=None)", "max_length": lm.max_length,
            "request_cache": str(cache_path) if cache_path is not None else None, "versions": versions,
        }
        # per-document accuracies (means over documents): comparisons on the same documents are paired
        per_doc = {m: example_scores(out["samples"][name], m) for m in MEAN_METRICS if m in metrics}
        results[name] = EvalResult(value=metrics[metric], metric=metric, protocol=protocol,
                                   extra={**metrics, "seconds_all_tasks": round(seconds, 3), "example_scores": per_doc})
    return results
