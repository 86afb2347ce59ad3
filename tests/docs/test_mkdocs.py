"""The docs site builds with ``mkdocs build --strict``: every page in the nav, every link
and anchor between pages resolves, no warning."""

from __future__ import annotations

import subprocess
import sys

from _blocks import ROOT


def test_mkdocs_builds_strict(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "manager" / "index.html").exists()
