"""Test-session environment: offline, quiet, Triton interpreter on CPU-only machines."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Tests import the independent references in tests/ as plain modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PTQBENCH_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _cuda_available():
    # Must be set before any @triton.jit function is defined (i.e. before the kernels are imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import harness  # noqa: E402,F401  (applies the offline defaults for everything else)


def pytest_collection_modifyitems(config, items):
    """The real-model integration tests run last: the fast unit tests print their progress from the first
    second instead of after minutes of SmolLM2 work (#20.4)."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
