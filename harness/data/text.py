"""Evaluation texts (GPTQ/QuaRot perplexity protocol), tokenisation cache and calibration windows.

Every function here records what it did (`*_protocol` dicts) so that a number can say which text,
which split, which documents and which tokenisation produced it.
"""
from __future__ import annotations

import functools
import hashlib
import random
from typing import Any

import torch

from harness.data.sources import data_dir, load_rows
from harness.errors import InvalidValueError, PtqbenchError, UnknownNameError

#: How the rows of each perplexity corpus become one text (GPTQ / QuaRot `get_loaders`).
EVAL_TEXTS: dict[str, dict[str, Any]] = {
    "wikitext2": {"join": "\n\n", "docs": None,
                  "rule": 'hub rows (file lines; blank lines as "") joined with "\\n\\n"'},
    "c4": {"join": " ", "docs": 1100,
           "rule": "first 1100 en validation docs (shard 0) joined with ' ' (GPTQ c4 protocol)"},
    "ptb": {"join": " ", "docs": None,
            "rule": "ptb_text_only sentences (lines stripped of surrounding spaces) joined with ' ' (GPTQ)"},
}
#: GPTQ evaluates C4 on its first 256 windows (valenc[:, :256 * seqlen]); the others use every window.
MAX_EVAL_WINDOWS: dict[str, int] = {"c4": 256}
CALIB_CORPORA: dict[str, str] = {"c4": "train", "wikitext2": "validation"}  # corpus -> default split

#: Tokenisation convention for every text here: no BOS/EOS added (the mirror's reference PPL uses this).
ADD_SPECIAL_TOKENS = False


def eval_source(name: str, split: str = "test") -> tuple[str, str]:
    """(dataset, split) a perplexity evaluation of `name` reads (C4's test is its validation split)."""
    return name, _eval_split(name, split)


def calib_source(corpus: str, split: str | None = None) -> tuple[str, str]:
    """(dataset, split) calibration windows of `corpus` are drawn from."""
    if corpus not in CALIB_CORPORA:
        raise UnknownNameError("calibration corpus", corpus, CALIB_CORPORA)
    return corpus, split or CALIB_CORPORA[corpus]


def _eval_split(name: str, split: str) -> str:
    if name not in EVAL_TEXTS:
        raise UnknownNameError("evaluation text", name, EVAL_TEXTS)
    # C4 has no public test split: its perplexity is measured on validation (GPTQ, QuaRot).
    return "validation" if (name == "c4" and split == "test") else split


@functools.lru_cache(maxsize=16)
def _eval_text(name: str, split: str, root: str | None) -> tuple[str, dict[str, Any]]:
    spec = EVAL_TEXTS[name]
    rows, where = load_rows(name, split, limit=spec["docs"])
    info = dict(where, join=spec["join"], rule=spec["rule"], chars=None)
    if spec["docs"] is not None:
        info["docs_protocol"] = spec["docs"]
        info["docs_used"] = len(rows)
        if len(rows) < spec["docs"]:
            info["docs_note"] = f"only {len(rows)} of the protocol's {spec['docs']} docs are available"
    text = spec["join"].join(rows)
    info["chars"] = len(text)
    info["sha256_16"] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return text, info


def load_eval_text(name: str, split: str = "test") -> str:
    """The perplexity text of `name` ("wikitext2", "c4", "ptb"), joined as GPTQ/QuaRot do."""
    split = _eval_split(name, split)
    root = data_dir()
    return _eval_text(name, split, str(root) if root else None)[0]


def eval_text_protocol(name: str, split: str = "test") -> dict[str, Any]:
    """Where the text of `load_eval_text(name, split)` came from and how it was joined."""
    split = _eval_split(name, split)
    root = data_dir()
    return dict(_eval_text(name, split, str(root) if root else None)[1])


# ------------------------------------------------------------------------------------------------
# tokenisation, cached per (tokenizer content, text) within the process


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content hash of a tokenizer (two loads of the same files share it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizers: fall back to the vocabulary
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    return h.hexdigest()[:16]


_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def encode(tokenizer: Any, text: str, cache_key: str | None = None) -> torch.Tensor:
    """1-D LongTensor of token ids for `text`, without special tokens. Cached when `cache_key` is given."""
    key = (tokenizer_fingerprint(tokenizer), cache_key) if cache_key else None
    if key is not None and key in _TOKEN_CACHE:
        return _TOKEN_CACHE[key]
    out = tokenizer(text, add_special_tokens=ADD_SPECIAL_TOKENS, return_attention_mask=False, verbose=False)
    ids = torch.tensor(out["input_ids"], dtype=torch.long)
    if key is not None:
        _TOKEN_CACHE[key] = ids
    return ids


def encode_eval_text(tokenizer: Any, name: str, split: str = "test") -> torch.Tensor:
    """Token ids of the whole perplexity text (tokenised once per tokenizer and text in this process)."""
    split = _eval_split(name, split)
    text = load_eval_text(name, split)
    info = eval_text_protocol(name, split)
    return encode(tokenizer, text, cache_key=f"eval:{name}:{split}:{info['sha256_16']}")


def clear_token_cache() -> None:
    _TOKEN_CACHE.clear()


# ------------------------------------------------------------------------------------------------
# calibration


def _doc_ids(tokenizer: Any, corpus: str, split: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
    rows, where = load_rows(corpus, split)
    digest = hashlib.sha256("\x00".join(rows).encode("utf-8")).hexdigest()[:16]
    key = (tokenizer_fingerprint(tokenizer), f"calibdocs:{corpus}:{split}:{digest}")
    docs = _DOC_CACHE.get(key)
    if docs is None:
        out = tokenizer(rows, add_special_tokens=ADD_SPECIAL_TOKENS, return_attention_mask=False, verbose=False)
        docs = [torch.tensor(ids, dtype=torch.long) for ids in out["input_ids"]]
        _DOC_CACHE[key] = docs
    return docs, where


_DOC_CACHE: dict[tuple[str, str], list[torch.Tensor]] = {}


def with_bos(windows: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """[n, L] -> [n, L + 1]: the BOS token in front of every window."""
    return torch.cat([torch.full((windows.shape[0], 1), bos_token_id, dtype=windows.dtype), windows], dim=1)


def calibration_windows(tokenizer: Any, corpus: str = "c4", n: int = 128, seqlen: int = 2048, seed: int = 0,
                        split: str | None = None, return_info: bool = False, bos_token_id: int | None = None):
    """`n` token windows of `seqlen` tokens, LongTensor [n, seqlen], drawn from `seed` alone.

    c4 (default split train), GPTQ's rule: pick a document uniformly among those longer than `seqlen`
    tokens, then a uniform start inside it. wikitext2 (default split validation: the mirror has no
    train split): the split's rows joined with "\\n\\n", tokenised once, uniform window starts.
    A private `random.Random(seed)` is used, so the global RNG state is never touched.
    With `return_info=True` returns (windows, info) where info records source, split and documents.
    With `bos_token_id` every window is BOS + seqlen - 1 drawn tokens (models that need BOS, e.g. Gemma).
    """
    if bos_token_id is not None:
        out = calibration_windows(tokenizer, corpus, n, seqlen - 1, seed, split, True)
        windows, info = with_bos(out[0], bos_token_id), {**out[1], "seqlen": seqlen, "bos_per_window": True}
        return (windows, info) if return_info else windows
    if corpus not in CALIB_CORPORA:
        raise UnknownNameError("calibration corpus", corpus, CALIB_CORPORA)
    if n < 1 or seqlen < 2:
        raise InvalidValueError("calibration size (n, seqlen)", (n, seqlen), "n >= 1 and seqlen >= 2")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        # random.Random(-1) draws what random.Random(1) draws: a negative seed would silently alias another
        raise InvalidValueError("calibration seed", seed, "an integer 0 <= seed < 2**63")
    split = split or CALIB_CORPORA[corpus]
    rng = random.Random(seed)
    info: dict[str, Any] = {"corpus": corpus, "split": split, "n": n, "seqlen": seqlen, "seed": seed,
                            "add_special_tokens": ADD_SPECIAL_TOKENS}
    windows: list[torch.Tensor] = []
    if corpus == "c4":
        docs, where = _doc_ids(tokenizer, corpus, split)
        eligible = [i for i, d in enumerate(docs) if d.numel() > seqlen]
        if not eligible:
            raise PtqbenchError(f"no {corpus} {split} document is longer than seqlen={seqlen} tokens "
                                f"({len(docs)} docs); use a smaller seqlen or corpus 'wikitext2'")
        picked = []
        for _ in range(n):
            d = eligible[rng.randrange(len(eligible))]
            start = rng.randint(0, docs[d].numel() - seqlen - 1)
            windows.append(docs[d][start:start + seqlen])
            picked.append(d)
        info.update(where, rule="doc uniform among docs longer than seqlen, start uniform (GPTQ)",
                    docs_total=len(docs), docs_eligible=len(eligible), docs_distinct=len(set(picked)))
    else:
        rows, where = load_rows(corpus, split)
        text = "\n\n".join(rows)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        ids = encode(tokenizer, text, cache_key=f"calib:{corpus}:{split}:{digest}")
        if ids.numel() <= seqlen:
            raise PtqbenchError(f"{corpus} {split} has {ids.numel()} tokens, not more than seqlen={seqlen}")
        for _ in range(n):
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start:start + seqlen])
        info.update(where, rule='rows joined with "\\n\\n", tokenised once, start uniform (GPTQ)',
                    tokens_total=ids.numel())
    out = torch.stack(windows)
    return (out, info) if return_info else out
