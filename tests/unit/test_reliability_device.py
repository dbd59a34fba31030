"""Bad devices are one line naming the value and the choices (defect 15), before any work is done."""
from __future__ import annotations

import pytest
import torch

from harness.cli import main
from harness.errors import InvalidValueError
from harness.spec.catalogs import check_device

SPEC = "experiments/smoke.yaml"


@pytest.mark.parametrize("device", ["tpu", "cuda0", "gpu", "cuda:x", ""])
def test_unknown_device_names_are_one_line(device, capsys, tmp_path):
    assert main(["run", SPEC, "--scale", "smoke", "--device", device, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and repr(device) in err and "cpu, cuda, cuda:N, mps" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_locally_but_can_be_planned(capsys, tmp_path):
    assert main(["run", SPEC, "--scale", "smoke", "--device", "cuda", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'cuda'" in err and "0 CUDA device(s)" in err
    # a dry run plans for a device this machine lacks (a GPU cluster's run ids)
    assert main(["run", SPEC, "--scale", "smoke", "--device", "cuda", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    with pytest.raises(InvalidValueError, match="cuda:3"):
        check_device("cuda:3")
    check_device("cuda:3", need_available=False)
    check_device("cpu")
