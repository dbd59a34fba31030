"""Tiny random models of every supported family, built locally (no download), deterministic by seed.

Geometry: hidden 128, 2 layers, 4 query heads sharing 2 KV heads (GQA), head_dim 32 (an MX block fits a
head, and every preset scheme, int4_g128 included, applies to every linear); Qwen3 uses head_dim 64 so
that heads x head_dim != hidden, as in the real Qwen3 models. MoE: 4 experts, top-2, expert width 128.
`llama_h96` has hidden 96 = 3 x 32 (not a power of two) for rotation tests; `gemma3` has Gemma-3's sandwich
norms and tied, scaled embeddings. Norm scales and biases are
random too (not the 1 / 0 of a fresh init), so folding a norm or a bias wrongly shows in the outputs.
The tokenizer is a 512-token byte-level BPE trained on a fixed generated text.
"""
from __future__ import annotations

import functools

import torch

from harness.errors import UnknownNameError

_COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6)
_MOE = dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256),
    "llama_h96": dict(model_type="llama", hidden_size=96, intermediate_size=192, num_attention_heads=3,
                      num_key_value_heads=1),
    "mistral": dict(model_type="mistral", hidden_size=128, intermediate_size=256),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=256),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, head_dim=64),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                      decoder_sparse_step=1, mlp_only_layers=[], **_MOE),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                      shared_expert_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[], **_MOE),
    "mixtral": dict(model_type="mixtral", hidden_size=128, intermediate_size=128, num_local_experts=4,
                    num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", hidden_size=128, intermediate_size=128, **_MOE),
    # Gemma-3: sandwich norms, (1 + w) norms, QK-norm, tied scaled embeddings; one sliding (window 8) and
    # one global layer, so short test sequences already see both masks
    "gemma3": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=256, num_key_value_heads=1,
                   head_dim=64, query_pre_attn_scalar=64, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
}


def list_tiny_families() -> list[str]:
    return sorted(FAMILIES)


def _corpus() -> list[str]:
    words = ("the of and to in is was for on as with by at from that which this are be an it his not or have "
             "quantization model rotation block scale format weight activation token layer expert matrix value "
             "river city war music season film species team game church school north south year first second").split()
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        idx = torch.randint(0, len(words), (12,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx).capitalize() + ". " + str(int(idx[0]) * 7) + ".")
    return lines


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 512-token byte-level BPE (GPT-2 style pre-tokenization), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_config(family: str):
    """The transformers config of a tiny family (sdpa attention)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise UnknownNameError("tiny model family", family, FAMILIES)
    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    tokenizer = tiny_tokenizer()
    common = {**_COMMON, **{k: spec.pop(k) for k in list(spec) if k in _COMMON}}
    spec.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **common, **spec)
    config._attn_implementation = "sdpa"
    return config


def make_tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, adapter) for a tiny random model of `family`, identical for equal seeds."""
    from transformers import AutoModelForCausalLM

    from harness.models.adapters import get_adapter

    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    model.to(dtype).eval().requires_grad_(False)
    return model, tiny_tokenizer(), get_adapter(model)
