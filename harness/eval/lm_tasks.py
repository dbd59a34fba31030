"""lm-eval task configs that read the local data mirror.

Tasks whose mirror files carry the hub fields reuse lm-eval's stock YAML through `include:` (so the
prompts, choice lists, process_docs functions and metrics are lm-eval's own) and only swap the data
source for `dataset_path: json` with absolute `data_files`. The three processed files (winogrande,
social_iqa, copa) have other fields, so they get their own configs, as close to the stock prompt as
the fields allow. Configs are rendered at run time into a temporary include directory because the
data paths are absolute (lm-eval resolves relative data_files against the CWD).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LmTask:
    name: str
    dataset: str  # harness.data dataset name (mirror file)
    split: str  # the split evaluated (lm-eval's validation_split or test_split)
    stock_dir: str  # directory of the stock task under lm_eval/tasks (hub mode indexes only these)
    stock_yaml: str | None  # stock YAML to include in mirror mode (None: own config below)
    metrics: tuple[str, ...]  # metrics the task reports
    prompt: str  # what the prompt is, recorded with every number
    config: dict[str, Any] = field(default_factory=dict)  # own config (mirror mode, processed forms)


def _mc(doc_to_text: str, doc_to_choice: str, doc_to_target: str) -> dict[str, Any]:
    return {"output_type": "multiple_choice", "doc_to_text": doc_to_text, "doc_to_choice": doc_to_choice,
            "doc_to_target": doc_to_target,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


TASKS: dict[str, LmTask] = {t.name: t for t in [
    LmTask("piqa", "piqa", "validation", "piqa", "piqa/piqa.yaml", ("acc", "acc_norm"), "stock"),
    LmTask("arc_easy", "arc_easy", "test", "arc", "arc/arc_easy.yaml", ("acc", "acc_norm"), "stock"),
    LmTask("arc_challenge", "arc_challenge", "test", "arc", "arc/arc_challenge.yaml", ("acc", "acc_norm"), "stock"),
    LmTask("hellaswag", "hellaswag", "validation", "hellaswag", "hellaswag/hellaswag.yaml", ("acc", "acc_norm"),
           "stock"),
    LmTask("lambada_openai", "lambada_openai", "test", "lambada", "lambada/lambada_openai.yaml",
           ("acc", "perplexity"), "stock"),
    LmTask("boolq", "boolq", "validation", "super_glue/boolq", "super_glue/boolq/default.yaml", ("acc",), "stock"),
    LmTask("openbookqa", "openbookqa", "test", "openbookqa", "openbookqa/openbookqa.yaml", ("acc", "acc_norm"),
           "stock"),
    # Partial evaluation exactly as the stock task: score the shared continuation after each filled-in prefix.
    LmTask("winogrande", "winogrande", "validation", "winogrande", None, ("acc",),
           "stock partial evaluation on the processed form (context_options, continuation, gold)",
           _mc("gold", "context_options", "continuation")),
    # The stock prompt needs context/question/answer fields; the mirror has the lettered query only.
    LmTask("social_iqa", "social_iqa", "validation", "siqa", None, ("acc",),
           "processed letter form: query lists the answers as letters, choices are the letters (not the stock "
           "'Q: ... A:' prompt)", _mc("query", "choices", "gold")),
    # Stock copa drops the premise's period and adds ' because'/' therefore'; the processed query keeps a
    # comma before the connective. Continuations are ' ' + the lower-cased choice (one space).
    LmTask("copa", "copa", "validation", "super_glue/copa", None, ("acc",),
           "processed form: query '<premise>, because/therefore', continuation ' <choice>' (stock has no comma)",
           _mc("query", "choices", "gold")),
]}


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


def mirror_config(task: LmTask, data_file: Path) -> dict[str, Any]:
    """The YAML dict for `task` reading `data_file` (absolute) as its only split."""
    cfg: dict[str, Any] = {}
    if task.stock_yaml is not None:
        cfg["include"] = str(lm_eval_tasks_dir() / task.stock_yaml)
    else:
        cfg.update(task.config)
    cfg.update({
        "task": task.name, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}},
        # the mirror has one split: no training split; few-shot examples come from the evaluated split
        "training_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
        "tag": [],  # stock tags (e.g. ai2_arc) would point at tasks not indexed here
    })
    cfg.setdefault("metadata", {"version": 1.0})
    return cfg
