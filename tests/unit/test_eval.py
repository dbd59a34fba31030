"""harness.eval on a tiny random Llama: perplexity vs a naive loop, windows, KL, errors, results."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from harness.data import MAX_EVAL_WINDOWS
from harness.eval import (EvalResult, NonFiniteError, collect_reference, kl_to_reference, logit_chunks,
                          make_windows, perplexity)
from harness.errors import InvalidValueError, PtqbenchError
from test_eval_kit import make_tokenizer, mirror_texts, tiny_llama, write_mirror


@pytest.fixture(scope="module")
def mirror_root(tmp_path_factory):
    return write_mirror(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture(autouse=True)
def _use_mirror(mirror_root, monkeypatch):
    monkeypatch.setenv("PTQBENCH_DATA_DIR", str(mirror_root))


@pytest.fixture(scope="module")
def tok(mirror_root):
    return make_tokenizer(mirror_texts(mirror_root))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=0)


def naive_windows(mirror_root, tok, seqlen):
    """Independent re-implementation: hub rows of the raw file, joined, tokenised, cut."""
    lines = (mirror_root / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    text = "\n\n".join(line if line.strip() else "" for line in lines)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    return [torch.tensor(ids[i * seqlen:(i + 1) * seqlen]) for i in range(n)], len(ids)


def naive_ppl(model, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(-1, w[1:, None]).sum().item()
            count += w.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_a_naive_loop(model, tok, mirror_root, batch_size):
    seqlen = 32
    windows, n_tokens = naive_windows(mirror_root, tok, seqlen)
    assert len(windows) >= 5
    res = perplexity(model, tok, "wikitext2", seqlen=seqlen, batch_size=batch_size)
    assert res.value == pytest.approx(naive_ppl(model, windows), rel=1e-6)
    assert res.metric == "ppl" and math.log(res.value) == pytest.approx(res.extra["nll"], rel=1e-12)
    p = res.protocol
    assert p["windows"] == len(windows) and p["tokens_text"] == n_tokens
    assert p["tokens_remainder_dropped"] == n_tokens - len(windows) * seqlen
    assert p["tokens_predicted"] == len(windows) * (seqlen - 1) and p["batch_size"] == batch_size
    assert p["dataset"] == "wikitext2" and p["split"] == "test" and p["add_special_tokens"] is False
    assert p["dtype"] == "float32" and {"torch", "transformers", "lm-eval"} <= set(p["versions"])


def test_window_cap_keeps_the_first_windows(model, tok, mirror_root):
    windows, _ = naive_windows(mirror_root, tok, 24)
    res = perplexity(model, tok, "wikitext2", seqlen=24, max_windows=2, batch_size=2)
    assert res.value == pytest.approx(naive_ppl(model, windows[:2]), rel=1e-6)
    assert res.protocol["windows"] == 2 and res.protocol["max_windows"] == 2
    assert res.protocol["windows_available"] == len(windows)


def test_make_windows_drops_the_remainder_and_caps():
    ids = torch.arange(10 * 7 + 3)
    w, info = make_windows(ids, 7)
    assert w.shape == (10, 7) and torch.equal(w[3], torch.arange(21, 28))
    assert info["tokens_remainder_dropped"] == 3 and info["tokens_predicted"] == 60
    w, info = make_windows(ids, 7, max_windows=4, protocol_cap=6)
    assert torch.equal(w, torch.arange(28).view(4, 7)) and info["windows_available"] == 10
    assert make_windows(ids, 7, max_windows=9, protocol_cap=6)[0].shape == (6, 7)
    with pytest.raises(InvalidValueError):
        make_windows(ids, 100)
    with pytest.raises(InvalidValueError):
        make_windows(ids, 7, max_windows=0)


def test_c4_applies_the_gptq_256_window_cap(model, tok):
    assert MAX_EVAL_WINDOWS["c4"] == 256
    res = perplexity(model, tok, "c4", seqlen=4, batch_size=64)
    assert res.protocol["windows_available"] > 256 and res.protocol["windows"] == 256
    assert res.protocol["split"] == "validation" and res.protocol["protocol_window_cap"] == 256


def test_chunked_head_path_matches_full_logits(model, tok):
    ids = torch.randint(0, len(tok), (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, :-1].reshape(-1, len(tok)).float()
        fast = torch.cat([c for _, c, _ in logit_chunks(model, ids, chunk_elements=7 * len(tok))])
        plain = torch.cat([c for _, c, _ in logit_chunks(model, ids, split_head=False)])
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-5) and torch.equal(plain, full)


def test_non_finite_logits_raise(model, tok):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError) as e:
        perplexity(broken, tok, "wikitext2", seqlen=16, max_windows=2)
    assert isinstance(e.value, PtqbenchError) and "non-finite" in str(e.value)


def test_tokenised_text_is_cached_across_tokenizer_objects(tok):
    from harness.data import encode_eval_text

    first = encode_eval_text(tok, "ptb")
    again = encode_eval_text(copy.deepcopy(tok), "ptb")
    assert again is first


def test_eval_result_round_trip():
    r = EvalResult(1.5, "ppl", {"dataset": "wikitext2", "seqlen": 8}, {"nll": 0.4})
    assert EvalResult.from_dict(r.to_dict()) == r and r.to_dict()["protocol"]["seqlen"] == 8


# ------------------------------------------------------------------------------------------------ KL


def full_kl(p_model, q_model, windows):
    """Independent full-vocabulary mean KL(P || Q) per predicted token, in fp64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(p_model(w[None]).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(q_model(w[None]).logits[0, :-1].double(), -1)
            total += (lp.exp() * (lp - lq)).sum().item()
            count += w.numel() - 1
    return total / count


def perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return other


def test_kl_of_a_model_to_its_own_reference_is_exactly_zero(model, tok):
    ref = collect_reference(model, tok, "wikitext2", seqlen=24, max_windows=3, topk=8, batch_size=2)
    res = kl_to_reference(model, ref)
    assert res.value == 0.0 and res.extra["top1_agreement"] == 1.0 and res.metric == "kl"
    assert res.protocol["topk"] == 8 and res.protocol["windows"] == 3 and res.extra["tokens"] == 3 * 23
    assert 0 < res.extra["fp_topk_mass"] < 1


def test_kl_is_positive_for_a_perturbed_model_and_exact_with_full_topk(model, tok, mirror_root):
    other = perturbed(model)
    windows, _ = naive_windows(mirror_root, tok, 24)
    exact = full_kl(model, other, windows[:3])
    full_ref = collect_reference(model, tok, "wikitext2", seqlen=24, max_windows=3, topk=len(tok))
    res_full = kl_to_reference(other, full_ref)
    assert res_full.value == pytest.approx(exact, rel=1e-4)
    ref = collect_reference(model, tok, "wikitext2", seqlen=24, max_windows=3, topk=5)
    res = kl_to_reference(other, ref)
    assert 0 < res.value <= exact * (1 + 1e-6)  # merging the tail into one bin can only lower KL
    assert 0 <= res.extra["top1_agreement"] <= 1
    # a larger perturbation moves further away
    assert kl_to_reference(perturbed(model, scale=0.3), ref).value > res.value
