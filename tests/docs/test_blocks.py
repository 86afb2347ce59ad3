"""Every Python block of the README and of ``docs/*.md`` runs as written (see ``_blocks.py``):
each in a fresh interpreter and a folder of its own, against a local S3 server where a block
names ``s3://``. Only blocks marked ``<!-- excerpt -->`` are skipped, and they are few.
"""

from __future__ import annotations

import resource
import shlex
import time
from pathlib import Path

import pytest
from _blocks import PAGES, ROOT, SUMMARY, Block, Run, blocks, chains, fences, run_all

FOUND = blocks()
RUNNABLE = [b for b in FOUND if not b.excerpt]
MAX_EXCERPTS = 5  # and at most a tenth of the blocks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_all(FOUND, tmp_path_factory.mktemp("docs"))
    wall, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    ran = sum(r.ran for r in done.values())
    slow = sorted(done.values(), key=lambda r: -r.seconds)[:3]
    SUMMARY.append(f"docs: {ran} Python blocks run, {len(FOUND) - len(RUNNABLE)} excerpts "
                   f"skipped, {wall:.1f} s wall, {cpu:.0f} s CPU in the blocks; slowest: "
                   + ", ".join(f"{r.block.id} {r.seconds:.1f} s" for r in slow))
    return done


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_block_runs(block: Block, runs: dict[str, Run]) -> None:
    run = runs[block.id]
    assert run.returncode == 0, f"{block.id} exited {run.returncode}:\n{run.output[-6000:]}"


def test_blocks_are_found_and_excerpts_are_few() -> None:
    assert {b.page.name for b in FOUND} >= {"README.md", "manager.md", "jax.md", "torch.md",
                                             "keras.md", "storage.md", "distributed.md"}
    excerpts = [b.id for b in FOUND if b.excerpt]
    assert len(excerpts) <= min(MAX_EXCERPTS, len(FOUND) // 10), excerpts
    assert sum(len(c) for c in chains(FOUND)) == len(RUNNABLE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_python_escapes_the_runner(page: Path) -> None:
    """Python under another fence name (``py``, ``python3``, ``pycon``) would not be run; a
    mark sits only on a Python block, and a ``run:`` mark names the script file it runs."""
    for fence, code, marks in fences(page):
        where = f"{page.relative_to(ROOT)}:{fence.line}"
        assert fence.language not in {"py", "python3", "pycon", "ipython", "py3"}, where
        if fence.language != "python":
            assert not marks, f"{where}: a mark on a {fence.language or 'plain'} block"
            continue
        assert ">>> " not in code, f"{where}: a doctest prompt; write a plain program"
        for mark in marks:
            if mark.startswith("run:"):
                assert shlex.split(mark[4:])[-1].endswith(".py"), f"{where}: {mark!r}"
