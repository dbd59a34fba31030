"""harness.eval lm-eval bridge: task configs, errors, and a tiny-model run checked by hand."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import UnknownNameError
from harness.eval import list_tasks, lm_eval_tasks, task_kinds
from harness.eval.lm_tasks import TASKS, lm_eval_tasks_dir, mirror_config
from test_eval_kit import make_tokenizer, mirror_texts, tiny_llama, write_mirror

TEN = {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "boolq", "openbookqa",
       "social_iqa", "copa"}
REAL_MIRROR = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_task_catalog():
    assert set(list_tasks()) == TEN
    kinds = task_kinds()
    assert kinds["wikitext2"] == "ppl" and kinds["c4"] == "ppl" and kinds["piqa"] == "lm_eval"


def test_unknown_task_lists_the_choices():
    with pytest.raises(UnknownNameError) as e:
        lm_eval_tasks(None, None, ["piqa", "piqa_xl"])
    assert "piqa_xl" in str(e.value) and "arc_easy" in str(e.value) and "winogrande" in str(e.value)


def test_stock_task_folders_define_the_same_task_names():
    """Hub mode indexes only these folders: each must define the task under our name."""
    from lm_eval.tasks import TaskManager

    dirs = sorted({str(lm_eval_tasks_dir() / t.stock_dir) for t in TASKS.values()})
    names = set(TaskManager(include_path=dirs, include_defaults=False).all_tasks)
    assert TEN <= names


def test_mirror_configs_point_at_absolute_files():
    for task in TASKS.values():
        cfg = mirror_config(task, Path("/abs/data") / f"{task.dataset}.jsonl")
        files = cfg["dataset_kwargs"]["data_files"]
        assert list(files) == [task.split] and Path(files[task.split]).is_absolute()
        assert cfg["task"] == task.name and cfg["dataset_path"] == "json" and cfg["training_split"] is None
        if task.stock_yaml:
            assert Path(cfg["include"]).is_file()
        else:
            assert cfg["output_type"] == "multiple_choice"


@pytest.mark.skipif(not REAL_MIRROR.is_dir(), reason="shared/data mirror not present")
def test_all_ten_tasks_build_from_the_real_mirror(tmp_path, monkeypatch):
    """Every rendered config loads with lm-eval and yields documents with a valid gold answer."""
    from lm_eval.tasks import TaskManager

    from harness.eval.lm_eval_bridge import _render_mirror_tasks

    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(REAL_MIRROR))
    _render_mirror_tasks(sorted(TEN), tmp_path)
    loaded = TaskManager(include_path=str(tmp_path), include_defaults=False).load(sorted(TEN))["tasks"]
    assert set(loaded) == TEN
    for name, task in loaded.items():
        doc = task.eval_docs[0]
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        if choices is not None:
            gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
            assert isinstance(gold, int) and 0 <= gold < len(choices), name
    assert len(loaded["hellaswag"].eval_docs) == 1000 and len(loaded["piqa"].eval_docs) == 1838


# ---------------------------------------------------------------------------------- tiny model run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_mirror(tmp_path_factory.mktemp("lmdata"))
    tok = make_tokenizer(mirror_texts(root))
    return root, tok, tiny_llama(len(tok), seed=2)


def hand_scored_piqa(model, tok, docs):
    """acc and acc_norm of lm-eval's piqa prompt, computed independently of lm-eval."""
    acc, acc_norm = [], []
    for d in docs:
        context = f"Question: {d['goal']}\nAnswer:"
        lls, lens = [], []
        for sol in (d["sol1"], d["sol2"]):
            ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(context + " " + sol, add_special_tokens=False)["input_ids"]
            ids = torch.tensor(whole)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            cont = range(len(ctx_ids), len(whole))
            lls.append(sum(logp[i - 1, whole[i]].item() for i in cont))
            lens.append(len(sol))
        acc.append(float(np.argmax(lls) == d["label"]))
        acc_norm.append(float(np.argmax(np.array(lls) / np.array(lens)) == d["label"]))
    return acc, acc_norm


def test_piqa_on_a_tiny_model_matches_hand_scoring(setup, monkeypatch, tmp_path):
    root, tok, model = setup
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(root))
    random.seed(123)
    state = (random.getstate(), torch.get_rng_state())
    cache = tmp_path / "lmcache"
    res = lm_eval_tasks(model, tok, ["piqa"], limit=8, batch_size=4, cache_path=cache, seed=5)["piqa"]
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    docs = [json.loads(line) for line in (root / "piqa" / "validation.jsonl").open()][:8]
    acc, acc_norm = hand_scored_piqa(model, tok, docs)
    assert res.extra["acc"] == pytest.approx(np.mean(acc)) and res.extra["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert res.extra["example_scores"] == {"acc": acc, "acc_norm": acc_norm}  # per document, in document order
    assert res.metric == "acc_norm" and res.value == res.extra["acc_norm"]
    p = res.protocol
    assert p["limit"] == 8 and p["docs_evaluated"] == 8 and p["docs_total"] == 12 and p["seed"] == 5
    assert p["source"] == "mirror" and p["data_file"] == "piqa/validation.jsonl" and p["num_fewshot"] == 0
    assert p["versions"]["lm-eval"] != "absent" and p["request_cache"] == str(cache)
    assert any(name.startswith("lmcache") for name in os.listdir(tmp_path))


def test_hub_mode_without_network_fails_with_one_line(setup, monkeypatch):
    """No mirror: the stock hub task is used; offline, that is a DatasetMissingError naming the task."""
    from harness.data import DatasetMissingError

    _, tok, model = setup
    monkeypatch.setenv("PTQBENCH_DATA_DIR", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetMissingError) as e:
        lm_eval_tasks(model, tok, ["piqa"], limit=2)
    assert "piqa" in str(e.value) and "\n" not in str(e.value)
