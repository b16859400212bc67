"""The built course site, checked in headless Chromium by docs/check_site.py.

Runs when Debian's chromium and chromium-driver, selenium and a built site (``sphinx-build -b html docs
docs/_build/html``) are all present, and is skipped otherwise (``.ci/run`` builds the site, then runs this).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "docs" / "_build" / "html"

pytest.importorskip("selenium")
if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)
if not (HTML / "index.html").exists():
    pytest.skip("the site is not built (sphinx-build -b html docs docs/_build/html)", allow_module_level=True)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_site_passes_the_browser_check(tmp_path):
    report_path = tmp_path / "site_check.json"
    run = subprocess.run([sys.executable, str(ROOT / "docs" / "check_site.py"), "--html", str(HTML),
                          "--report", str(report_path)], capture_output=True, text=True, timeout=600)
    report = json.loads(report_path.read_text())
    assert report["problems"] == [], run.stdout
    assert run.returncode == 0, run.stdout + run.stderr

    pages = report["pages"]
    # one page per notebook, in the order of their names, plus the home page, the tutorial and the API
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert [p for p in pages if p.startswith("notebooks/")] == [f"notebooks/{n}.html" for n in notebooks]
    assert {"index.html", "tutorial.html", "api.html", "search.html"} <= set(pages)
    # every notebook's figures are on its page, and the chapters' equations are typeset
    for name in notebooks:
        page = pages[f"notebooks/{name}.html"]
        assert page["images"] >= page["notebookImages"]
    assert sum(p["typeset"] for p in pages.values()) >= 40
    assert pages["notebooks/02_model_equations.html"]["typeset"] >= 8   # Eq. 1-8
    assert report["searchHits"] > 0
    # the API reference: its docstring equations typeset (the check fails on raw TeX, :math: left as text,
    # anything past the column and unresolved references)
    assert pages["api.html"]["typeset"] >= 300
    # four screenshots at 980 px (home, two chapters, the API reference)
    assert len(report["screenshots"]) == 4
    for shot in report["screenshots"]:
        width, height = _png_size(Path(shot))
        assert width == 980 and height > 600
