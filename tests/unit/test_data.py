"""harness.data: mirror layout, GPTQ text protocols, errors, seeded calibration windows."""
from __future__ import annotations

import json
import random

import pytest
import torch

from harness import data
from harness.data import (DatasetMissingError, calibration_windows, data_dir, eval_text_protocol, load_eval_text,
                          load_rows)
from harness.errors import PtqbenchError, UnknownNameError
from test_eval_kit import make_tokenizer, mirror_texts, write_mirror


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    root = write_mirror(tmp_path / "data")
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = write_mirror(tmp_path_factory.mktemp("tokdata"))
    return make_tokenizer(mirror_texts(root))


def test_data_dir_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("PTQBENCH_DATA_DIR", "")  # set but empty: no mirror, the hub
    assert data_dir() is None
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path.resolve()


def test_without_the_variable_the_mirror_next_to_the_checkout_is_found(monkeypatch, tmp_path):
    """(#20.3) Plain `ptqbench run` failed every cell: only the Makefile set PTQBENCH_DATA_DIR."""
    from harness.data import sources

    monkeypatch.delenv("PTQBENCH_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "NEXT_TO_CHECKOUT", tmp_path / "shared" / "data")
    assert data_dir() is None  # nothing there
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "README.md").write_text("mirror")
    assert data_dir() == tmp_path / "shared" / "data"


def test_wikitext2_rows_and_join(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    raw = " \n = Title = \n \n First line . \n \n Second @-@ line . \n"
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(raw, encoding="utf-8")
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path))
    rows, where = load_rows("wikitext2", "test")
    # hub rows: blank lines become "", other lines keep their "\n"
    assert rows == ["", " = Title = \n", "", " First line . \n", "", " Second @-@ line . \n"]
    assert where["source"] == "mirror" and where["rows"] == 6
    expected = "\n\n" + " = Title = \n" + "\n\n" + "\n\n" + " First line . \n" + "\n\n" + "\n\n" + " Second @-@ line . \n"
    assert load_eval_text("wikitext2") == expected
    assert eval_text_protocol("wikitext2")["chars"] == len(expected)


def test_c4_uses_the_first_1100_validation_docs_joined_with_spaces(tmp_path, monkeypatch):
    (tmp_path / "c4").mkdir()
    docs = [f"doc {i} text" for i in range(1105)]
    with (tmp_path / "c4" / "c4_validation_shard0_first1025.jsonl").open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path))
    assert load_eval_text("c4") == " ".join(docs[:1100])
    info = eval_text_protocol("c4")
    assert info["split"] == "validation" and info["docs_used"] == 1100 and "docs_note" not in info


def test_c4_records_missing_docs(mirror):
    info = eval_text_protocol("c4", "validation")
    assert info["docs_used"] == 40 and info["docs_protocol"] == 1100 and "40 of" in info["docs_note"]


def test_ptb_strips_lines_and_joins_with_spaces(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n d e \n f \n", encoding="utf-8")
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path))
    assert load_eval_text("ptb") == "a b c d e f"


def test_missing_dataset_is_one_line_naming_dataset_dir_and_choices(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(" a \n")
    (tmp_path / "empty_folder").mkdir()
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetMissingError) as e:
        load_eval_text("ptb")
    msg = str(e.value)
    assert isinstance(e.value, PtqbenchError) and "\n" not in msg
    assert "'ptb'" in msg and str(tmp_path.resolve()) in msg and "available there: wikitext2" in msg


def test_unknown_dataset_and_split_list_the_choices(mirror):
    with pytest.raises(UnknownNameError) as e:
        load_eval_text("wikitext3")
    assert "wikitext2" in str(e.value) and "c4" in str(e.value) and "ptb" in str(e.value)
    with pytest.raises(UnknownNameError) as e:
        load_rows("wikitext2", "train")
    assert "test" in str(e.value) and "validation" in str(e.value)
    with pytest.raises(UnknownNameError):
        calibration_windows(None, corpus="ptb2")


def test_hub_path_when_no_data_dir(monkeypatch, request):
    """Without a mirror the rows come from datasets.load_dataset with the hub ids; same join rule."""
    import datasets

    calls = []

    def fake_load_dataset(**kwargs):
        calls.append(kwargs)
        return {"text": ["", " = T = \n", "", " body . \n"]}

    monkeypatch.setenv("PTQBENCH_DATA_DIR", "")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data.text._eval_text.cache_clear()
    request.addfinalizer(data.text._eval_text.cache_clear)  # do not leak the fake rows
    assert load_eval_text("wikitext2") == "\n\n = T = \n\n\n\n\n body . \n"
    assert calls == [{"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}]
    assert eval_text_protocol("wikitext2")["source"] == "hub"

    def failing(**kwargs):
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DatasetMissingError) as e:
        load_rows("c4", "validation", limit=1100)
    assert "\n" not in str(e.value) and "'c4'" in str(e.value) and "allenai/c4" in str(e.value)


def _contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    n = needle.numel()
    if haystack.numel() < n:
        return False
    return bool((haystack.unfold(0, n, 1) == needle).all(-1).any())


def test_c4_calibration_windows_are_seeded_slices_of_long_docs(mirror, tok):
    state_py, state_torch = random.getstate(), torch.get_rng_state()
    seqlen = 24
    w, info = calibration_windows(tok, "c4", n=16, seqlen=seqlen, seed=3, return_info=True)
    assert random.getstate() == state_py and torch.equal(torch.get_rng_state(), state_torch)
    assert w.shape == (16, seqlen) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows(tok, "c4", n=16, seqlen=seqlen, seed=3))
    assert not torch.equal(w, calibration_windows(tok, "c4", n=16, seqlen=seqlen, seed=4))
    # every window is a contiguous slice of one train document longer than seqlen tokens
    docs = [json.loads(line)["text"] for line in (mirror / "c4" / "c4_train_shard0_first_docs.jsonl").open()]
    ids = [torch.tensor(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    long_docs = [d for d in ids if d.numel() > seqlen]
    assert 0 < len(long_docs) < len(ids)
    for row in w:
        assert any(_contains(d, row) for d in long_docs)
    assert info["split"] == "train" and info["docs_eligible"] == len(long_docs) and info["seed"] == 3
    with pytest.raises(PtqbenchError, match="longer than seqlen"):
        calibration_windows(tok, "c4", n=2, seqlen=100000)


def test_wikitext2_calibration_windows_come_from_the_validation_text(mirror, tok):
    w, info = calibration_windows(tok, "wikitext2", n=5, seqlen=16, seed=0, return_info=True)
    lines = (mirror / "wikitext2" / "wiki.valid.raw").read_text().splitlines(keepends=True)
    text = "\n\n".join(line if line.strip() else "" for line in lines)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert info["split"] == "validation" and info["tokens_total"] == ids.numel()
    for row in w:
        assert _contains(ids, row)
