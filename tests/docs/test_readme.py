"""The README: its first two commands, and its plain-loop quick start, run twice (the
second run resumes)."""

from __future__ import annotations

import subprocess
import sys

from _blocks import ROOT, blocks, fences

README = ROOT / "README.md"


def test_the_first_commands_are_make_demo_and_make_test() -> None:
    """`.ci/run` calls `make test`; a reader starts with `make demo`."""
    first = next(code for fence, code, _ in fences(README) if fence.language in {"sh", "bash"})
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"], commands


def test_plain_quick_start_runs_and_resumes(tmp_path) -> None:
    block = blocks([README])[0]
    assert "CheckpointManager" in block.code and not block.marks
    script = tmp_path / "quickstart.py"
    script.write_text(block.code)

    def run() -> str:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    first, second = run(), run()
    best = [[x for x in out.splitlines() if x.startswith("best:")] for out in (first, second)]
    assert best[0] and best[0] == best[1], (first, second)  # the same best: nothing redone
    assert "resumed" not in first and "resumed" in second, (first, second)
    assert len(list((tmp_path / "ckpts").iterdir())) <= 4  # keep_best=2, keep_last=1, index
