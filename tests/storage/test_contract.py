"""The storage contract: one suite, every backend (see ``conftest.BACKENDS``).

Round trips, safe replacement, manifest-last commits, startup cleanup of dead leftovers,
resuming from storage alone (index present, lost, stale or corrupt). Restore and local-disk
durability: ``test_restore_durability.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from _states import _data_files, _names, _state, _value

import checkpointer
from checkpointer import CheckpointManager, manifest
from checkpointer import format as fmt
from checkpointer.commit import OLD_PREFIX, TMP_PREFIX
from checkpointer.errors import (
    CheckpointNotFoundError,
    StorageError,
)
from checkpointer.frame import encode_framed
from checkpointer.index import INDEX_NAME
from checkpointer.owners import HOST as _HOST

DEAD = 2**22 + 12345  # above the default pid_max on Linux: never a live process




# -- round trips ---------------------------------------------------------------------------


def test_save_load_round_trip(backend: Any) -> None:
    state = {
        "a": np.arange(10, dtype=np.int16).reshape(2, 5).T,
        "b": [1, 2.5, None, b"x"],
        "c": (np.float32(3), "s"),
    }
    info = checkpointer.save(f"{backend.url}/one", state, metadata={"note": "hi"})
    assert info.name == "one" and info.nbytes > 0
    got = checkpointer.load(f"{backend.url}/one")
    np.testing.assert_array_equal(got["a"], state["a"])
    assert got["b"] == [1, 2.5, None, b"x"] and got["c"] == (np.float32(3), "s")
    assert checkpointer.api.read_metadata(f"{backend.url}/one") == {"note": "hi"}
    assert backend.listdir() == ["one"]


def test_manager_round_trip(backend: Any) -> None:
    with CheckpointManager(backend.url, max_file_bytes=40) as mgr:
        info = mgr.save(_state(1.0), step=3, epoch=1, metrics={"loss": 0.5})
        assert len(_data_files(backend, info.name)) > 1
        assert (info.step, info.epoch, info.metrics) == (3, 1, {"loss": 0.5})
        assert info.nbytes == sum(
            len(backend.read(f"{info.name}/{f}")) for f in backend.listdir(info.name)
        )
        ckpt = mgr.restore()
    assert ckpt.info.name == info.name and _value(ckpt.state) == 1.0


def test_load_missing_checkpoint(backend: Any) -> None:
    with pytest.raises(CheckpointNotFoundError):
        checkpointer.load(f"{backend.url}/nothing")
    with pytest.raises(CheckpointNotFoundError):
        CheckpointManager(backend.url).restore()


# -- replacing a name ------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["second-data-file", "manifest"])
def test_failed_replacement_keeps_the_old_checkpoint(
    backend: Any, fail_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = CheckpointManager(backend.url, filename="fixed", max_file_bytes=40)
    old = mgr.save(_state(1.0), metrics={"loss": 1.0})
    before = {f: backend.read(f"fixed/{f}") for f in backend.listdir("fixed")}
    real_write, real_encode = fmt.write_safetensors, encode_framed
    calls: list[str] = []

    def write(*args: Any, **kwargs: Any) -> Any:
        calls.append("data")
        if fail_at == "second-data-file" and len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        return real_write(*args, **kwargs)

    def encode(magic: bytes, obj: Any) -> bytes:
        if fail_at == "manifest" and "tree" in obj:
            raise OSError(5, "I/O error (injected)")
        return real_encode(magic, obj)

    monkeypatch.setattr(fmt, "write_safetensors", write)
    monkeypatch.setattr(manifest, "encode_framed", encode)
    with pytest.raises(StorageError):
        mgr.save(_state(2.0), metrics={"loss": 2.0})
    monkeypatch.undo()
    assert _names(mgr) == ["fixed"] and mgr.latest == old
    assert _value(checkpointer.load(f"{backend.url}/fixed")) == 1.0
    assert {f: backend.read(f"fixed/{f}") for f in backend.listdir("fixed")} == before
    assert [e for e in backend.listdir() if not e.startswith(".ckpt-index")] == ["fixed"]
    reopened = CheckpointManager(backend.url)
    assert _names(reopened) == ["fixed"] and reopened.latest.metrics == {"loss": 1.0}


def test_replacement_swaps_whole_checkpoint(backend: Any) -> None:
    mgr = CheckpointManager(backend.url, filename="fixed", max_file_bytes=40)
    mgr.save(_state(1.0, n=5))
    mgr.save(_state(2.0, n=2))
    assert _names(mgr) == ["fixed"]
    assert _value(checkpointer.load(f"{backend.url}/fixed")) == 2.0
    assert len(checkpointer.load(f"{backend.url}/fixed")["w"]) == 2
    assert len(_data_files(backend, "fixed")) == 2  # no data file of the old one is left
    assert [e for e in backend.listdir() if not e.startswith(".ckpt-index")] == ["fixed"]


# -- manifest last, foreign entries, cleanup ---------------------------------------------------


def _foreign(backend: Any) -> dict[str, bytes]:
    """Plant things the engine did not write; return {path: bytes}."""
    items = {
        "README.txt": b"mine",
        "notes/a.txt": b"also mine",
        "partial/data-00000.safetensors": b"\0" * 24,
        f"{TMP_PREFIX}user-folder/x.bin": b"not ours: no owner token",
        f"{TMP_PREFIX}live-{_HOST}.{os.getppid()}.abcd1234/data-00000.safetensors": b"live",
        f"{TMP_PREFIX}other-otherhost.{DEAD}.abcd1234/data-00000.safetensors": b"remote",
    }
    for rel, data in items.items():
        backend.write(rel, data)
    return items


def test_folder_without_manifest_is_not_a_checkpoint(backend: Any) -> None:
    info = checkpointer.save(f"{backend.url}/good", _state(1.0))
    # a data file under a name the engine never writes: not an engine leftover either
    backend.write(
        "partial/model.safetensors", backend.read(f"good/{_data_files(backend, 'good')[0]}")
    )
    mgr = CheckpointManager(backend.url, keep_last=1)
    assert _names(mgr) == [info.name]
    with pytest.raises(CheckpointNotFoundError):
        checkpointer.load(f"{backend.url}/partial")
    with pytest.raises(CheckpointNotFoundError):
        mgr.restore("partial")
    for i in range(3):
        mgr.save(_state(float(i)), step=i)
    assert backend.exists("partial/model.safetensors")
    assert "partial" not in _names(mgr) and "good" in _names(mgr)  # not ours: kept


def test_startup_cleanup_removes_only_dead_leftovers(backend: Any) -> None:
    items = _foreign(backend)
    dead_tmp = f"{TMP_PREFIX}step-000000005-{_HOST}.{DEAD}.0badf00d"
    backend.write(f"{dead_tmp}/data-00000.safetensors", b"\0" * 16)
    backend.write(f"{dead_tmp}/manifest.msgpack", b"junk")
    backend.write(f"{TMP_PREFIX}index-{_HOST}.{DEAD}.0badf00e", b"junk index")
    mgr = CheckpointManager(backend.url)
    assert _names(mgr) == []
    assert not backend.exists(dead_tmp)
    assert not backend.exists(f"{TMP_PREFIX}index-{_HOST}.{DEAD}.0badf00e")
    for rel, data in items.items():
        assert backend.read(rel) == data, f"{rel} was touched"


@pytest.mark.parametrize("new_committed", [True, False])
def test_cleanup_finishes_an_interrupted_swap(backend: Any, new_committed: bool) -> None:
    checkpointer.save(f"{backend.url}/fixed", _state(1.0))
    old_aside = f"{OLD_PREFIX}fixed-{_HOST}.{DEAD}.0badf00d"
    for f in backend.listdir("fixed"):
        backend.write(f"{old_aside}/{f}", backend.read(f"fixed/{f}"))
    if new_committed:  # crash after the new one went in: the old one goes
        checkpointer.save(f"{backend.url}/fixed", _state(2.0))
    else:  # crash between the two renames: the old one comes back
        backend.fs.rm(backend.path("fixed"), recursive=True)
    mgr = CheckpointManager(backend.url)
    assert _names(mgr) == ["fixed"]
    assert not backend.exists(old_aside)
    assert _value(mgr.restore().state) == (2.0 if new_committed else 1.0)


def test_object_store_cleanup_of_orphaned_data(backend: Any) -> None:
    mgr = CheckpointManager(backend.url)
    if mgr._store.atomic_rename:
        pytest.skip("orphaned data objects exist only on stores without atomic rename")
    info = mgr.save(_state(1.0), step=1)
    orphan = f"{info.name}/data-{_HOST}.{DEAD}.0badf00d-00000.safetensors"
    backend.write(orphan, b"\0" * 16)
    live = f"{info.name}/data-{_HOST}.{os.getppid()}.0badf00d-00000.safetensors"
    backend.write(live, b"\0" * 16)
    mgr = CheckpointManager(backend.url)
    assert not backend.exists(orphan) and backend.exists(live)
    assert _value(mgr.restore().state) == 1.0


# -- resuming ----------------------------------------------------------------------------------


def _run(backend: Any, **kw: Any) -> tuple[CheckpointManager, bytes]:
    mgr = CheckpointManager(backend.url, monitor="val_loss", keep_last=2, keep_best=1, **kw)
    index_after_first = b""
    for epoch, loss in enumerate([0.5, 0.2, 0.4, 0.6, 0.3], start=1):
        mgr.epoch_end(epoch, _state(float(epoch)), metrics={"val_loss": loss})
        if epoch == 1:
            index_after_first = backend.read(INDEX_NAME)
    return mgr, index_after_first


@pytest.mark.parametrize("index", ["present", "deleted", "stale", "corrupt", "empty"])
def test_reopen_resumes_from_storage(backend: Any, index: str) -> None:
    mgr, old_index = _run(backend)
    want = (_names(mgr), mgr.best.name, mgr.latest.name, [c.metrics for c in mgr.checkpoints])
    assert want[:3] == (
        ["epoch-000002", "epoch-000004", "epoch-000005"],
        "epoch-000002",
        "epoch-000005",
    )
    if index == "deleted":
        backend.fs.rm_file(backend.path(INDEX_NAME))
    elif index == "stale":
        backend.write(INDEX_NAME, old_index)
    elif index == "corrupt":
        backend.flip_last_byte(INDEX_NAME)
    elif index == "empty":
        backend.write(INDEX_NAME, b"")
    again = CheckpointManager(backend.url, monitor="val_loss", keep_last=2, keep_best=1)
    got = (
        _names(again),
        again.best.name,
        again.latest.name,
        [c.metrics for c in again.checkpoints],
    )
    assert got == want
    assert [c.step for c in again.checkpoints] == [c.step for c in mgr.checkpoints]
    assert [c.epoch for c in again.checkpoints] == [2, 4, 5]
    assert [c.nbytes for c in again.checkpoints] == [c.nbytes for c in mgr.checkpoints]
    # and it carries on exactly as the first run would have
    again.epoch_end(6, _state(6.0), metrics={"val_loss": 0.25})
    assert _names(again) == ["epoch-000002", "epoch-000005", "epoch-000006"]
    assert again.best.name == "epoch-000002"
    third = CheckpointManager(backend.url, monitor="val_loss")
    assert _names(third) == _names(again)


def test_saving_onto_a_foreign_name_never_deletes_it(backend: Any) -> None:
    backend.write("best/notes.txt", b"mine")
    backend.write("last", b"x")
    refused = []
    for name in ("best", "last"):
        mgr = CheckpointManager(backend.url, filename=name)
        try:
            mgr.save(_state(1.0))
        except StorageError:
            refused.append(name)
    assert backend.read("best/notes.txt") == b"mine"
    assert backend.read("last") == b"x"
    assert refused == ["best", "last"]
    CheckpointManager(backend.url)  # startup is not disturbed by what happened


class _Died(BaseException):
    """The process stops here (no cleanup runs)."""


def test_index_stale_for_a_replaced_name(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    opts: dict[str, Any] = {"monitor": "val_loss", "save_best_only": True, "filename": "best"}
    mgr = CheckpointManager(backend.url, **opts)
    mgr.epoch_end(1, _state(1.0), metrics={"val_loss": 0.5})

    def die(*args: Any, **kwargs: Any) -> None:
        raise _Died()

    monkeypatch.setattr("checkpointer.index.write_index", die)
    with pytest.raises(_Died):  # the run dies after the commit, before rewriting the index
        mgr.epoch_end(2, _state(2.0), metrics={"val_loss": 0.2})
    monkeypatch.undo()
    again = CheckpointManager(backend.url, **opts)
    assert again.best is not None and again.best.metrics == {"val_loss": 0.2}
    assert again.epoch_end(3, _state(3.0), metrics={"val_loss": 0.3}) is None
    assert _value(again.restore("best").state) == 2.0


def test_index_row_of_a_name_replaced_by_another_writer_is_not_believed(backend: Any) -> None:
    a = CheckpointManager(backend.url, monitor="val_loss", filename="{tag}")
    a.save(_state(1.0), metrics={"val_loss": 0.5, "tag": "slot"})
    b = CheckpointManager(backend.url, monitor="val_loss", filename="{tag}")
    b.save(_state(2.0), metrics={"val_loss": 0.2, "tag": "slot"})  # replaces it behind a's back
    a.save(_state(3.0), metrics={"val_loss": 0.9, "tag": "other"})  # a's index: slot at 0.5
    again = CheckpointManager(backend.url, monitor="val_loss")
    slot = next(c for c in again.checkpoints if c.name == "slot")
    assert slot.metrics["val_loss"] == 0.2
    assert _value(again.restore("slot").state) == 2.0
    assert again.best is not None and again.best.name == "slot"
