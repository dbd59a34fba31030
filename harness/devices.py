"""Device names: which ones torch can use, and whether this machine has them (one-line errors)."""
from __future__ import annotations

import re

from harness.errors import InvalidValueError

DEVICE_NAMES = "cpu, cuda, cuda:N, mps"


def check_device(device: str, need_available: bool = True) -> None:
    """One line for a device name torch cannot use (`tpu`), or, with `need_available`, one this machine
    lacks (`cuda` without a GPU). A driver may plan for devices it lacks (Ray workers have the GPUs)."""
    import torch

    device = str(device)  # a torch.device too
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise InvalidValueError("device", device, DEVICE_NAMES)
    if not need_available or device == "cpu":
        return
    if device == "mps":
        ok, seen = torch.backends.mps.is_available(), "no MPS device"
    else:
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok, seen = index < count, f"{count} CUDA device(s)"
    if not ok:
        raise InvalidValueError("device", device, f"a device this machine has (torch sees {seen}); use cpu")
