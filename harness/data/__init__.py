"""Evaluation and calibration data, from a local mirror (PTQBENCH_DATA_DIR) or the Hugging Face hub.

    load_eval_text("wikitext2")                     # GPTQ/QuaRot perplexity text
    calibration_windows(tok, "c4", n=128, seqlen=2048, seed=0)   # LongTensor [128, 2048]

Layout of the mirror: shared/data/README.md. A dataset missing from the mirror raises a one-line
`DatasetMissingError`; an unknown name raises `UnknownNameError` with the choices.
"""
from harness.data.sources import (DATASETS, ENV_VAR, SOURCES, DataFileError, DatasetMissingError, available_in, check_available,
                                  data_dir,
                                  load_rows, mirror_path, source, splits)
from harness.data.text import (ADD_SPECIAL_TOKENS, CALIB_CORPORA, EVAL_TEXTS, MAX_EVAL_WINDOWS, calib_source,
                               calibration_windows, eval_source,
                               clear_token_cache, encode, encode_eval_text, eval_text_protocol, load_eval_text,
                               tokenizer_fingerprint, with_bos)

__all__ = [
    "ADD_SPECIAL_TOKENS", "CALIB_CORPORA", "DATASETS", "ENV_VAR", "EVAL_TEXTS", "MAX_EVAL_WINDOWS", "SOURCES",
    "DataFileError", "DatasetMissingError", "available_in", "calib_source", "check_available", "eval_source", "calibration_windows", "clear_token_cache", "data_dir", "encode",
    "encode_eval_text", "eval_text_protocol", "load_eval_text", "load_rows", "mirror_path", "source", "splits",
    "tokenizer_fingerprint", "with_bos",
]
