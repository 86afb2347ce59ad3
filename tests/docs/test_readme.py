"""The README's plain-loop quick start runs as written (twice: the second run resumes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_plain_quick_start_runs_and_resumes(tmp_path):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert "CheckpointManager" in block
    script = tmp_path / "quickstart.py"
    script.write_text(block)
    first = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert first.stdout.split()[0] == second.stdout.split()[0]  # same best checkpoint name
    assert len(list((tmp_path / "ckpts").iterdir())) <= 4  # keep_best=2, keep_last=1, index
