"""notebooks/analysis.ipynb runs top to bottom (CI executes it) and matches its generator script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
EXAMPLES = ROOT / "results" / "examples" / "smoke"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_notebook_is_generated_from_its_script(tmp_path):
    """The .ipynb is the script's output (the script is what reviewers read in diffs)."""
    script = (ROOT / "notebooks" / "make_analysis_notebook.py").read_text()
    copy = tmp_path / "make_analysis_notebook.py"
    copy.write_text(script)
    subprocess.run([sys.executable, str(copy)], check=True, capture_output=True)
    sources = lambda nb: [c["source"] for c in nb["cells"]]  # noqa: E731
    assert sources(json.loads((tmp_path / "analysis.ipynb").read_text())) == sources(json.loads(NOTEBOOK.read_text()))


def test_notebook_runs_on_the_committed_smoke_results(tmp_path, monkeypatch):
    assert (EXAMPLES / "runs").is_dir(), "results/examples/smoke/runs is missing"
    monkeypatch.setenv("PTQBENCH_RESULTS_DIR", str(EXAMPLES))
    monkeypatch.setenv("PTQBENCH_NOTEBOOK_OUT", str(tmp_path / "plots"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") + json.dumps(o.get("data", {})) for c in nb.cells for o in c.get("outputs", []))
    assert "runs from" in outputs and "rtn" in outputs and "gptq" in outputs
    assert list((tmp_path / "plots").glob("*.png")), "the plot cell wrote no figure"
