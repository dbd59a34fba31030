"""Offline-by-default process environment.

Set before torch/transformers/datasets/wandb/ray are imported, so that nothing leaves the machine
unless the user asked for it (a variable the user already set always wins). See research/stack.md.
"""
from __future__ import annotations

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


def _mirror_configured() -> bool:
    """PTQBENCH_DATA_DIR set (non-empty), or unset with the mirror next to the checkout (harness.data.data_dir)."""
    value = os.environ.get("PTQBENCH_DATA_DIR")
    if value is not None:
        return bool(value.strip())
    return (Path(__file__).resolve().parents[2] / "shared" / "data" / "README.md").is_file()


def apply_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Without a local data mirror or cached hub files the hub is the only source, so only force the
    # hub offline when the user points us at a mirror (PTQBENCH_DATA_DIR) or asks for it explicitly.
    if os.environ.get("PTQBENCH_OFFLINE", "") == "1" or _mirror_configured():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
