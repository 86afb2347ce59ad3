"""Retention's deletes run in the background (checkpointer.reaper): the dropped checkpoint
is gone from the listing when ``save`` returns, its files go a little later, no cleanup
races the delete, a save that runs out of space meanwhile waits for it and succeeds, and
a forked child does not inherit the parent's queue."""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager, reaper
from checkpointer.commit import cleanup
from checkpointer.storage import open_store

MIB = 1 << 20


def _state(step: int, mib: float = 0.01) -> dict[str, object]:
    return {"step": step, "w": np.full(int(mib * MIB) // 4, step, np.float32)}


@pytest.fixture
def held() -> Iterator[threading.Event]:
    """The deleting thread held by a job until the event is set (set at the end anyway)."""
    go = threading.Event()
    reaper.later(lambda: go.wait(30))
    try:
        yield go
    finally:
        go.set()
        reaper.wait_removals()


def test_dropped_checkpoint_leaves_the_listing_at_once(tmp_path: Path, held: threading.Event) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(_state(1), step=1)
    mgr.save(_state(2), step=2)
    names = sorted(os.listdir(tmp_path))
    assert "step-000000001" not in names and "step-000000002" in names
    hidden = [n for n in names if n.startswith(".ckpt-tmp-step-000000001-")]
    assert len(hidden) == 1, names  # renamed aside, its delete queued behind the held job
    assert reaper.pending()
    # Its owner is live until the delete ends: no cleanup (here or in another manager) takes it.
    assert cleanup(open_store(str(tmp_path))) == []
    again = CheckpointManager(tmp_path, keep_last=1)
    assert [c.name for c in again.checkpoints] == ["step-000000002"]
    held.set()
    mgr.wait()  # waits for the deletes too
    assert not reaper.pending()
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".ckpt-index")) == [
        "step-000000002"]
    assert checkpointer.load(tmp_path / "step-000000002")["step"] == 2


def test_close_waits_for_the_deletes(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=2) as mgr:
        for step in range(1, 6):
            mgr.save(_state(step), step=step)
    assert not reaper.pending()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ckpt-tmp-")]
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints] == [4, 5]


def test_out_of_space_waits_for_the_deletes_and_saves(small_tmpfs: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """10 MiB: the 3 MiB checkpoint being deleted and the kept one leave no room for the
    next; that save fails for space, waits for the delete, tries again and commits."""
    go = threading.Event()
    waited: list[bool] = []
    real_wait = reaper.wait_removals

    def wait_removals() -> None:  # the delete may run from the moment the save waits for it
        waited.append(reaper.pending())
        go.set()
        real_wait()

    monkeypatch.setattr(reaper, "wait_removals", wait_removals)
    reaper.later(lambda: go.wait(30))
    mgr = CheckpointManager(small_tmpfs / "ck", keep_last=1)
    try:
        mgr.save(_state(1, 3), step=1)
        mgr.save(_state(2, 3), step=2)  # step 1's delete waits behind the held job
        filler = small_tmpfs / "filler"
        free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 2 * MIB))  # 2 MiB left: step 3 cannot fit
        info = mgr.save(_state(3, 3), step=3)
    finally:
        go.set()
        real_wait()
    assert waited == [True]  # it ran out of space once, with the delete pending
    assert info is not None and info.step == 3
    assert [c.step for c in mgr.checkpoints] == [3]
    assert float(np.asarray(checkpointer.load(small_tmpfs / "ck" / info.name)["w"])[0]) == 3.0
    mgr.close()


def _child_pending(queue: multiprocessing.Queue[bool]) -> None:
    queue.put(reaper.pending())
    reaper.wait_removals()  # returns: the child has nothing queued
    queue.put(True)


def test_forked_child_has_no_queue(held: threading.Event) -> None:
    assert reaper.pending()
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bool] = ctx.Queue()
    child = ctx.Process(target=_child_pending, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=20) is False
        assert queue.get(timeout=20) is True
    finally:
        child.join(20)
    assert child.exitcode == 0
