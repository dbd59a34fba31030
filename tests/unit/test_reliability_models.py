"""Reliability probe regression: a local model directory is fingerprinted by content, not path (defect 1)."""
import json
import os

import pytest

from harness.models import loading


@pytest.fixture(autouse=True)
def fp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_FINGERPRINT_CACHE", str(tmp_path / "fpcache.json"))
    loading._DiskShaCache._instance = None


def model_dir(tmp_path, weights=b"\x00" * 64):
    d = tmp_path / "mymodel"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (d / "model.safetensors.index.json").write_text("{}")
    (d / "model.safetensors").write_bytes(weights)
    return d


def test_resaved_weights_change_the_fingerprint(tmp_path):
    d = model_dir(tmp_path)
    first = loading.model_fingerprint(str(d))
    assert first["kind"] == "dir" and first["content"]
    assert loading.model_fingerprint(str(d)) == first  # unchanged directory: same fingerprint
    st = (d / "model.safetensors").stat()
    model_dir(tmp_path, b"\x01" * 64)  # same size, different weights
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert loading.model_fingerprint(str(d)) != first
    (d / "config.json").write_text(json.dumps({"hidden_size": 16}))
    assert loading.model_fingerprint(str(d))["content"] != first["content"]


def test_unchanged_files_are_not_rehashed(tmp_path, monkeypatch):
    d = model_dir(tmp_path)
    first = loading.dir_content_hash(d)
    loading._sha256_prefix.cache_clear()
    loading._DiskShaCache._instance = None  # a fresh process: only the disk cache is left

    def boom(*a):
        raise AssertionError("rehashed an unchanged file")

    monkeypatch.setattr(loading, "_sha256_prefix", boom)
    assert loading.dir_content_hash(d) == first


def test_hub_fingerprint_unchanged():
    assert loading.model_fingerprint("org/some-model", "abc") == {"kind": "hub", "hub_id": "org/some-model",
                                                                   "revision": "abc"}


def test_alias_fingerprints_unchanged():
    info = loading.ModelInfo("smollm2-135m", "gguf", alias="smollm2-135m", path="/x/y/model.gguf", sha256="ab" * 8)
    assert info.fingerprint() == {"kind": "gguf", "alias": "smollm2-135m", "path": "model.gguf", "sha256": "ab" * 8}
    tiny = loading.ModelInfo("tiny", "tiny", alias="tiny", family="llama")
    assert tiny.fingerprint() == {"kind": "tiny", "alias": "tiny", "family": "llama"}
