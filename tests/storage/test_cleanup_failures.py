"""Deleting is best effort and never locks a directory: undeletable leftovers and failed
retention deletes are warnings; files the engine did not write survive a retention delete."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from checkpointer import CheckpointManager
from checkpointer.commit import TMP_PREFIX
from checkpointer.owners import HOST

DEAD = 2**22 + 12345  # above the default pid_max on Linux: never a live process


@contextlib.contextmanager
def immutable(path: Path, root: Path) -> Iterator[None]:
    """``chattr +i`` on ``path`` for the block, then ``-i`` on everything under ``root``
    (the file may have moved); skips where the filesystem or user cannot."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(root)], check=True)


@pytest.mark.parametrize("url", ["local", "memory://cleanup-user-file"])
def test_retention_keeps_a_users_file_inside_a_checkpoint(tmp_path: Path, url: str) -> None:
    directory = str(tmp_path) if url == "local" else f"{url}-{tmp_path.name}"
    with CheckpointManager(directory, keep_last=1) as mgr:
        first = mgr.save({"w": np.zeros(3)}, step=1)
        store = mgr._store
        store.put_bytes(f"{first.name}/notes.txt", b"mine")
        mgr.save({"w": np.ones(3)}, step=2)
        assert [c.name for c in mgr.checkpoints] == ["step-000000002"]
    assert store.read_bytes(f"{first.name}/notes.txt") == b"mine"
    assert sorted(store.list_folder(first.name)) == ["notes.txt"]  # the engine's files are gone
    assert [c.name for c in CheckpointManager(directory).checkpoints] == ["step-000000002"]


def test_an_undeletable_old_checkpoint_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save({"w": np.zeros(3)}, step=1)
    data = next((tmp_path / first.name).glob("*.safetensors"))
    with immutable(data, tmp_path), caplog.at_level(logging.WARNING, "checkpointer"):
        mgr.save({"w": np.ones(3)}, step=2)
        assert [c.name for c in mgr.checkpoints] == ["step-000000002"]
        reopened = CheckpointManager(tmp_path, keep_last=1)  # cleanup fails on the leftover: a warning
        assert [c.name for c in reopened.checkpoints] == ["step-000000002"]
        assert reopened.save({"w": np.full(3, 3.0)}, step=3).step == 3
    assert any("could not" in r.message for r in caplog.records)
    assert not (tmp_path / first.name).exists()  # renamed aside: never listed again
    CheckpointManager(tmp_path)  # now deletable: cleanup finishes it (its owner is this process, done)


def test_a_crash_leftover_that_cannot_be_removed_does_not_lock_the_directory(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.zeros(3)}, step=1)
    leftover = tmp_path / f"{TMP_PREFIX}step-000000002-{HOST}.{DEAD}.0abc"
    leftover.mkdir()
    (leftover / "data-00000.safetensors").write_bytes(b"partial")
    with immutable(leftover / "data-00000.safetensors", tmp_path):
        mgr = CheckpointManager(tmp_path)
        assert [c.step for c in mgr.checkpoints] == [1]
        assert mgr.save({"w": np.ones(3)}, step=2).step == 2
    assert not CheckpointManager(tmp_path).checkpoints[-1].name.startswith(".")
    assert not leftover.exists()  # removed once it could be


def test_replacing_a_name_that_is_a_symlink_leaves_no_leftover(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    with CheckpointManager(elsewhere, filename="slot") as mgr:
        mgr.save({"w": np.zeros(3)}, step=1)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere / "slot", run / "slot")
    with CheckpointManager(run, filename="slot") as mgr:
        mgr.save({"w": np.ones(3)}, step=2)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".ckpt-old")) == []
    assert np.array_equal(CheckpointManager(run).restore("latest").state["w"], np.ones(3))
    assert (elsewhere / "slot" / "manifest.msgpack").exists()  # the link's target was not deleted
