from __future__ import annotations

import shutil
import subprocess

import pytest
from test_leaderboard import frame

from harness.report.site import build_site


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_site_files(tmp_path):
    df = frame().assign(run_id=[f"r{i}" for i in range(6)])
    index = build_site(df, tmp_path)
    page = index.read_text()
    assert "<table id='runs'>" in page and "leaderboard" in page
    for img in tmp_path.rglob("*.png"):
        assert f"src='{img.relative_to(tmp_path)}'" in page
    assert len(list(tmp_path.rglob("*.png"))) == 2


@pytest.mark.skipif(browser() is None, reason="no Chromium installed (apt-get install chromium)")
def test_site_renders_in_headless_chromium_without_console_errors(tmp_path):
    df = frame().assign(run_id=[f"r{i}" for i in range(6)])
    index = build_site(df, tmp_path)
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=3000", "--dump-dom", index.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert "<table id=\"runs\">" in dom and "leaderboard" in dom
    assert 'id="shown">6<' in dom  # the filter script ran and counted every run
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "rror" in line], console
    for img in tmp_path.rglob("*.png"):
        assert img.stat().st_size > 1000
