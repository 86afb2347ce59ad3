"""Disk full and fsync failure on local disk.

Disk full: a 10 MiB tmpfs fills up in the middle of a save. The save raises a
``StorageError`` carrying the OS cause (ENOSPC); earlier checkpoints stay byte-identical
and loadable; retention deletes nothing; once space is freed the next save succeeds.

fsync failure: ``os.fsync`` failing at each of its calls in turn fails the save (never
retried into a success), and nothing of it is visible afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _checks import engine_leftovers

import checkpointer
from checkpointer import CheckpointManager, StorageError
from checkpointer.storage import open_store

MIB = 1 << 20


def state_at(step: int, mib: float) -> dict[str, object]:
    return {"step": step, "w": np.full(int(mib * MIB) // 4, step, np.float32)}


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "index" not in p.name
    }


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_mid_save(small_tmpfs: Path, trials: Counter[str], async_save: bool) -> None:
    d = small_tmpfs / f"ck-{async_save}"
    with CheckpointManager(d, keep_last=2, async_save=async_save) as mgr:
        for step in (0, 1):
            mgr.save(state_at(step, 2), step=step)
        mgr.wait()
        before = digest(d)
        filler = small_tmpfs / "filler"
        free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
        filler.write_bytes(b"\0" * (free - MIB))  # 1 MiB left: the 2 MiB save fills it up
        with pytest.raises(StorageError) as info:
            mgr.save(state_at(2, 2), step=2)
            mgr.wait()  # an async save's error surfaces here
        cause = info.value.__cause__
        assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(cause)
        assert (
            "No space left" in str(info.value)
            or "ENOSPC" in str(info.value)
            or "28" in str(info.value)
        )
        assert [i.step for i in mgr.checkpoints] == [0, 1] and mgr.latest.step == 1
        assert digest(d) == before, "an earlier checkpoint changed"
        assert not engine_leftovers(open_store(d), ["step-000000000", "step-000000001"])
        for step in (0, 1):
            assert (checkpointer.load(d / f"step-00000000{step}")["w"] == step).all()
        filler.unlink()
        mgr.save(state_at(2, 2), step=2)  # space is back: the next save succeeds
        mgr.wait()
        assert [i.step for i in mgr.checkpoints] == [1, 2]  # and retention runs again
    assert (CheckpointManager(d).restore("latest").state["w"] == 2).all()
    trials["disk-full saves"] += 1


@pytest.fixture
def fsync_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """``os.fsync`` that fails with EIO at call number ``fail_at`` (1-based)."""
    real = os.fsync
    calls = {"n": 0, "fail_at": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise OSError(errno.EIO, "injected fsync failure")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_fsync_failure_fails_the_save(
    tmp_path: Path, fsync_calls: dict[str, int], trials: Counter[str]
) -> None:
    # Count the fsyncs of one commit (data files, manifest, folder, parent folder).
    probe = tmp_path / "probe"
    CheckpointManager(probe).save(state_at(0, 0.01), step=0)
    fsync_calls["n"] = 0
    CheckpointManager(probe).save(state_at(1, 0.01), step=1)
    per_save = fsync_calls["n"]
    assert per_save >= 4
    failed = 0
    for k in range(1, per_save + 1):
        d = tmp_path / f"case{k}"
        mgr = CheckpointManager(d, max_file_bytes=20000)
        mgr.save(state_at(0, 0.01), step=0)
        before = digest(d)
        fsync_calls["n"], fsync_calls["fail_at"] = 0, k
        try:
            mgr.save(state_at(1, 0.01), step=1)
        except StorageError as exc:
            assert "fsync" in str(exc)
            failed += 1
        else:  # only the index (a cache) may fail after the commit: the save stands
            assert mgr.latest.step == 1 and k > 4, f"fsync #{k} failed yet the save succeeded"
            assert [i.step for i in CheckpointManager(d).checkpoints] == [0, 1]
            continue
        finally:
            fsync_calls["fail_at"] = 0
        assert fsync_calls["n"] == k, "fsync called again after it failed: retried?"
        assert mgr.latest.step == 0
        reopened = CheckpointManager(d)
        assert [i.step for i in reopened.checkpoints] == [0], f"fsync #{k}: the failed save shows"
        assert digest(d) == before
        assert not engine_leftovers(open_store(d), ["step-000000000"])
        trials["fsync-failure cases (save failed, nothing visible)"] += 1
    # the data file, the manifest, the staging folder and the parent folder, at least (the
    # data file is fsynced once: the fsync started before its checksums covers every byte)
    assert failed >= 4
