"""Helpers (no tests) for the data/eval unit tests: a small fake data mirror, a BPE tokenizer trained
on it, and tiny random Llama models. Imported by test_data*.py and test_eval*.py."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are which this be "
         "film river city team song war king game album station church road ship school army species "
         "played built moved became released won lost named opened located described").split()


def sentence(rng: random.Random, n: int | None = None) -> str:
    n = n or rng.randint(4, 14)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def wiki_lines(rng: random.Random, n_articles: int) -> list[str]:
    """Lines in the wiki.*.raw layout: ' = Title = ', blank lines as ' ', paragraphs of sentences."""
    lines = []
    for _ in range(n_articles):
        lines += [" \n", f" = {sentence(rng, 2).title()} = \n", " \n"]
        for _ in range(rng.randint(1, 3)):
            lines.append(" " + " . ".join(sentence(rng) for _ in range(rng.randint(2, 5))) + " . \n")
            lines.append(" \n")
    return lines


def write_mirror(root: Path, seed: int = 0, c4_docs: int = 40, with_tasks: bool = True) -> Path:
    """A small data dir with the shared/data layout (wikitext2, c4, ptb, piqa)."""
    rng = random.Random(seed)
    (root / "wikitext2").mkdir(parents=True, exist_ok=True)
    (root / "wikitext2" / "wiki.test.raw").write_text("".join(wiki_lines(rng, 12)), encoding="utf-8")
    (root / "wikitext2" / "wiki.valid.raw").write_text("".join(wiki_lines(rng, 10)), encoding="utf-8")
    (root / "c4").mkdir(exist_ok=True)
    for name in ("c4_validation_shard0_first1025.jsonl", "c4_train_shard0_first_docs.jsonl"):
        with (root / "c4" / name).open("w", encoding="utf-8") as f:
            for i in range(c4_docs):
                # every fourth document is long, the rest short (calibration eligibility)
                n = rng.randint(60, 90) if i % 4 == 0 else rng.randint(3, 12)
                f.write(json.dumps({"text": ". ".join(sentence(rng) for _ in range(n // 4 + 1)),
                                    "timestamp": "2019", "url": f"u{i}"}) + "\n")
    (root / "ptb").mkdir(exist_ok=True)
    (root / "ptb" / "ptb.test.txt").write_text("".join(f" {sentence(rng)} \n" for _ in range(60)), encoding="utf-8")
    if with_tasks:
        (root / "piqa").mkdir(exist_ok=True)
        with (root / "piqa" / "validation.jsonl").open("w", encoding="utf-8") as f:
            for _ in range(12):
                f.write(json.dumps({"goal": sentence(rng), "sol1": sentence(rng), "sol2": sentence(rng, 3),
                                    "label": rng.randint(0, 1)}) + "\n")
    return root


def make_tokenizer(texts: list[str], vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so the distributions are not flat
        model.lm_head.weight.mul_(20)
    return model


def mirror_texts(root: Path) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*")) if p.is_file()]
