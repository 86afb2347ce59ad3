"""The storage contract, part 2: restore and its fallback on every backend, and on local
disk the durability rules (fsync of files and folders, a failing fsync fails the save)."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
from _states import _data_files, _names, _state, _value

import checkpointer
from checkpointer import CheckpointManager, CheckpointWarning
from checkpointer.commit import TMP_PREFIX
from checkpointer.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
)
from checkpointer.index import INDEX_NAME
from checkpointer.owners import HOST as _HOST

# -- restore -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "value"),
    [("latest", 30.0), ("best", 20.0), ("step-000000010", 10.0), (10, 10.0), (30, 30.0)],
)
def test_restore(backend: Any, which: Any, value: float) -> None:
    mgr = CheckpointManager(backend.url, monitor="val_loss", every_n_epochs=None, every_n_steps=10)
    for step, loss in [(10, 0.3), (20, 0.1), (30, 0.2)]:
        mgr.step_end(step, _state(float(step)), metrics={"val_loss": loss})
    ckpt = mgr.restore(which)
    assert _value(ckpt.state) == value and ckpt.info.step == int(value)
    assert _value(CheckpointManager(backend.url, monitor="val_loss").restore(which).state) == value


@pytest.mark.parametrize("which", ["nope", 99])
def test_restore_unknown(backend: Any, which: Any) -> None:
    checkpointer.save(f"{backend.url}/a", _state(1.0))
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(backend.url).restore(which)


def test_restore_best_without_monitor(backend: Any) -> None:
    with pytest.raises(ConfigurationError):
        CheckpointManager(backend.url).restore("best")


def _corrupt(backend: Any, name: str) -> None:
    backend.flip_last_byte(f"{name}/{_data_files(backend, name)[0]}")


@pytest.mark.parametrize(
    ("which", "broken", "fallback_value"),
    [("latest", "step-000000030", 20.0), ("best", "step-000000020", 30.0)],
)
def test_restore_falls_back_with_a_warning(
    backend: Any, which: str, broken: str, fallback_value: float
) -> None:
    mgr = CheckpointManager(backend.url, monitor="val_loss", every_n_steps=10)
    for step, loss in [(10, 0.3), (20, 0.1), (30, 0.2)]:
        mgr.step_end(step, _state(float(step)), metrics={"val_loss": loss})
    _corrupt(backend, broken)
    with pytest.warns(CheckpointWarning, match=broken):
        ckpt = mgr.restore(which)
    assert _value(ckpt.state) == fallback_value
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(which, fallback=False)
    with pytest.raises(CorruptCheckpointError):
        mgr.restore(broken)  # a named checkpoint never falls back
    with pytest.raises(CorruptCheckpointError), warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr.restore(int(broken.split("-")[1]))
    assert _value(mgr.restore(broken, verify=False).state) == float(int(broken.split("-")[1]))


def test_restore_nothing_verifies(backend: Any) -> None:
    mgr = CheckpointManager(backend.url)
    for step in (1, 2):
        mgr.save(_state(float(step)), step=step)
    for c in mgr.checkpoints:
        _corrupt(backend, c.name)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointNotFoundError):
        mgr.restore()


# -- local disk: durability ------------------------------------------------------------------


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_fsync_of_files_and_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(_fd_path(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "ckpts"
    mgr = CheckpointManager(root, max_file_bytes=40)
    info = mgr.save(_state(1.0), step=1)
    names = sorted(os.listdir(root / info.name))
    assert len(names) >= 3
    files = {
        os.path.basename(p)
        for p in synced
        if os.path.basename(os.path.dirname(p)).startswith(f"{TMP_PREFIX}{info.name}-")
    }
    assert files == set(names), "every data file and the manifest is fsynced before the rename"
    folders = [p for p in synced if os.path.basename(p).startswith(f"{TMP_PREFIX}{info.name}-")]
    assert folders, "the checkpoint folder is fsynced"
    assert str(root) in synced, "the parent folder is fsynced after the rename"
    first_root = synced.index(str(root))
    assert all(synced.index(p) < first_root for p in folders)
    synced.clear()
    mgr.save(_state(2.0), step=1)  # replacing a name: the parent is fsynced too
    assert str(root) in synced


def _count_fsyncs(tmp_path: Path) -> int:
    n = 0
    real = os.fsync

    def fsync(fd: int) -> None:
        nonlocal n
        n += 1
        real(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        checkpointer.save(tmp_path / "count" / "c", _state(1.0))
    return n


@pytest.mark.parametrize("replace", [False, True], ids=["new", "replace"])
def test_failing_fsync_fails_the_save(tmp_path: Path, replace: bool) -> None:
    total = _count_fsyncs(tmp_path)
    assert total >= 3
    for k in range(total):
        root = tmp_path / f"r{k}"
        if replace:
            checkpointer.save(root / "c", _state(1.0))
        calls = 0

        def fsync(fd: int, k: int = k, real: Any = os.fsync) -> None:
            nonlocal calls
            calls += 1
            if calls == k + 1:
                raise OSError(5, "Input/output error (injected)")
            real(fd)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "fsync", fsync)
            with pytest.raises(StorageError):
                checkpointer.save(root / "c", _state(2.0))
        mgr = CheckpointManager(root)
        if replace:
            assert _names(mgr) == ["c"], f"fsync #{k + 1} failing lost the old checkpoint"
            assert _value(mgr.restore("c").state) == 1.0, f"fsync #{k + 1}: new one visible"
        else:
            assert _names(mgr) == [], f"fsync #{k + 1} failing left a visible checkpoint"
        left = sorted(e for e in os.listdir(root) if e != INDEX_NAME)
        assert left == (["c"] if replace else []), f"fsync #{k + 1}: leftovers {left}"


def test_failing_fsync_in_manager_is_not_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = CheckpointManager(tmp_path / "m")
    mgr.save(_state(1.0), step=1)

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError):
        mgr.save(_state(2.0), step=2)
    monkeypatch.undo()
    assert _names(mgr) == ["step-000000001"] and mgr.latest.step == 1
    assert _names(CheckpointManager(tmp_path / "m")) == ["step-000000001"]


def test_host_token_is_this_host() -> None:
    assert _HOST and _HOST in "".join(c for c in socket.gethostname() if c.isalnum())
