"""Offline-by-default process environment.

Set before torch/transformers/datasets/wandb/ray are imported, so that nothing leaves the machine
unless the user asked for it (a variable the user already set always wins). See research/stack.md.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "DO_NOT_TRACK": "1",
    "WANDB_MODE": "offline",
    "WANDB_ERROR_REPORTING": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "MPLBACKEND": "Agg",
}


#: Log lines that come on every command and ask nothing of the user: (logger, text the message contains).
#: torchao (a test-only reference, imported by transformers when installed) cannot load its CUDA kernels on a
#: CPU build; torch warns about a registration torchao does. Everything else from these loggers still shows.
QUIET_LOG_LINES = (("torchao", "Failed to load"), ("torch.utils._pytree", "is an Enum subclass"))


class _DropLines(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


def quiet_known_noise() -> None:
    for name, text in QUIET_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) and f.text == text for f in logger.filters):
            logger.addFilter(_DropLines(text))


def _mirror_configured() -> bool:
    """PTQBENCH_DATA_DIR set (non-empty), or unset with the mirror next to the checkout (harness.data.data_dir)."""
    value = os.environ.get("PTQBENCH_DATA_DIR")
    if value is not None:
        return bool(value.strip())
    return (Path(__file__).resolve().parents[2] / "shared" / "data" / "README.md").is_file()


def apply_offline_defaults() -> None:
    quiet_known_noise()
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Without a local data mirror or cached hub files the hub is the only source, so only force the
    # hub offline when the user points us at a mirror (PTQBENCH_DATA_DIR) or asks for it explicitly.
    if os.environ.get("PTQBENCH_OFFLINE", "") == "1" or _mirror_configured():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
