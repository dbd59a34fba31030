"""Reliability probe regressions: nothing the harness writes lands outside its root (defect 19)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import engine_fakes  # noqa: E402

from harness.cli import main  # noqa: E402
from harness.errors import PtqbenchError  # noqa: E402
from harness.spec import SpecError, load_spec  # noqa: E402
from harness.store import Store  # noqa: E402

BASE = """
models: [tiny-a]
methods: [fp, toy_rtn]
schemes: [w8]
tasks: [toy_ppl]
ppl: {seqlen: 16, max_windows: 1}
"""


@pytest.fixture(autouse=True)
def toys(monkeypatch):
    engine_fakes.install(monkeypatch)
    monkeypatch.setenv("PTQBENCH_PROGRESS", "0")


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("paper", ["../../escaped", "/tmp/abs", "a/b", ".hidden", ".."])
def test_spec_paper_must_be_a_name(tmp_path, paper):
    with pytest.raises(SpecError, match="invalid paper") as info:
        load_spec(write(tmp_path, BASE + f"paper: '{paper}'\n"))
    assert "spec.yaml:7" in str(info.value)


@pytest.mark.parametrize("key", ["name", "label"])
def test_spec_name_and_labels_must_be_names(tmp_path, key):
    text = BASE + "name: ../../x\n" if key == "name" else BASE.replace("toy_rtn]", "{name: toy_rtn, label: ../x}]")
    with pytest.raises(SpecError, match=f"invalid {key}"):
        load_spec(write(tmp_path, text))


def test_write_report_stays_inside_results(tmp_path):
    from harness.reproduce import write_report

    spec = load_spec(write(tmp_path, BASE + "paper: okpaper\n"))
    spec.file.paper = "../../escaped"  # as if the check were bypassed
    with pytest.raises(PtqbenchError):
        write_report(spec, spec.cells(), Store(tmp_path / "res"), None)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


@pytest.mark.parametrize("paper", ["../../x", "../papers/awq", "/etc/passwd", "a/../../b"])
def test_reproduce_and_report_refuse_traversal(tmp_path, capsys, paper):
    for command in ("reproduce", "report"):
        assert main([command, paper, "--results-dir", str(tmp_path / "res")]) == 2
        assert "unknown paper" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("*.md"))


def test_paper_spec_path_refuses_traversal():
    from harness.reproduce import paper_spec_path

    with pytest.raises(PtqbenchError):
        paper_spec_path("../papers/awq")
    assert paper_spec_path("awq").name == "awq.yaml"


def test_plot_names_are_file_names(tmp_path, monkeypatch):
    from harness.report.plots import _save

    class Fig:
        def savefig(self, p, **kw):
            Path(p).write_text("x")

    import harness.report.plots as plots

    monkeypatch.setattr(plots, "_plt", lambda: type("P", (), {"close": staticmethod(lambda f: None)}))
    paths = _save(Fig(), tmp_path / "out", "../../evil")
    assert all((tmp_path / "out") in p.parents for p in paths)
