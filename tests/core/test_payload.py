"""File checkpoints (``CheckpointManager(payload=...)``) and ``rank_existing=False``.

The writer here writes the state's bytes as they are, standing in for a framework's own
file (Keras's ``.weights.h5``): the manager must commit, rank, retain, index and list such
files like any other checkpoint, and ``checkpointer ls`` / ``verify`` / ``inspect`` see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from checkpointer import CheckpointManager
from checkpointer.cli import main
from checkpointer.errors import CheckpointNotFoundError, ChecksumMismatchError, ConfigurationError
from checkpointer.owners import new_owner
from checkpointer.payload import SIDECAR_SUFFIX, read_file_manifest, sidecar, verify_file
from checkpointer.storage import open_store


def write(state: bytes, path: str) -> None:
    with open(path, "wb") as f:
        f.write(state)


def manager(directory: object, **kw: object) -> CheckpointManager:
    opts: dict = {"monitor": "val_loss", "filename": "m{epoch}.bin", "payload": write, **kw}
    return CheckpointManager(directory, **opts)  # type: ignore[arg-type]


def visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("async_save", [False, True])
def test_files_are_committed_ranked_retained_and_listed(tmp_path: Path, async_save: bool) -> None:
    with manager(tmp_path, keep_best=1, keep_last=1, async_save=async_save) as mgr:
        for epoch, loss in enumerate([0.5, 0.3, 0.4, 0.6], 1):
            mgr.epoch_end(epoch, b"model %d" % epoch, metrics={"val_loss": loss})
        mgr.wait()
        assert [c.name for c in mgr.checkpoints] == ["m2.bin", "m4.bin"]
        assert mgr.best is not None and mgr.best.name == "m2.bin"
    assert visible(tmp_path) == ["m2.bin", "m4.bin"]
    assert (tmp_path / "m2.bin").read_bytes() == b"model 2"  # the writer's bytes, as written
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [".ckpt-index.msgpack", sidecar("m2.bin"), sidecar("m4.bin")]
    again = manager(tmp_path)
    assert [(c.name, c.epoch, c.metrics) for c in again.checkpoints] == [
        ("m2.bin", 2, {"val_loss": 0.3}), ("m4.bin", 4, {"val_loss": 0.6})]
    assert again.best is not None and again.best.name == "m2.bin"


def test_save_best_only_replaces_a_fixed_name_in_place(tmp_path: Path) -> None:
    mgr = manager(tmp_path, filename="best.bin", save_best_only=True)
    for epoch, loss in enumerate([0.5, 0.7, 0.2], 1):
        mgr.epoch_end(epoch, b"e%d" % epoch, metrics={"val_loss": loss})
    assert (tmp_path / "best.bin").read_bytes() == b"e3"
    assert [(c.name, c.epoch) for c in mgr.checkpoints] == [("best.bin", 3)]
    assert read_file_manifest(open_store(tmp_path), "best.bin").get("epoch") == 3


def test_a_failed_write_leaves_the_previous_file_and_no_leftover(tmp_path: Path) -> None:
    mgr = manager(tmp_path, filename="best.bin")
    mgr.epoch_end(1, b"good", metrics={"val_loss": 0.5})

    def torn(state: bytes, path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    broken = manager(tmp_path, filename="best.bin", payload=torn)
    with pytest.raises(OSError, match="disk full"):
        broken.epoch_end(2, b"new", metrics={"val_loss": 0.1})
    assert sorted(os.listdir(tmp_path)) == [".best.bin" + SIDECAR_SUFFIX, ".ckpt-index.msgpack",
                                            "best.bin"]
    assert (tmp_path / "best.bin").read_bytes() == b"good"
    assert [c.epoch for c in broken.checkpoints] == [1]


def test_a_dead_writers_temporary_folder_is_removed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = new_owner().split(".")[0]
    dead = tmp_path / f".ckpt-tmp-m1.bin-{host}.{gone}.00ff"
    dead.mkdir()
    (dead / "m1.bin").write_bytes(b"half")
    manager(tmp_path)
    assert not dead.exists()


def test_files_replaced_or_removed_behind_the_managers_back(tmp_path: Path) -> None:
    mgr = manager(tmp_path)
    mgr.epoch_end(1, b"one", metrics={"val_loss": 0.5})
    mgr.epoch_end(2, b"two", metrics={"val_loss": 0.4})
    (tmp_path / "m2.bin").write_bytes(b"someone else's")  # replaced: no longer the engine's
    os.remove(tmp_path / "m1.bin")  # deleted by the user: its sidecar is an orphan
    (tmp_path / "m1.bin.txt").write_bytes(b"x")
    again = manager(tmp_path, keep_last=1)
    assert again.checkpoints == []
    assert not (tmp_path / sidecar("m1.bin")).exists()
    again.epoch_end(3, b"three", metrics={"val_loss": 0.3})
    again.epoch_end(4, b"four", metrics={"val_loss": 0.2})
    assert visible(tmp_path) == ["m1.bin.txt", "m2.bin", "m4.bin"]  # never deleted m2.bin
    assert (tmp_path / "m2.bin").read_bytes() == b"someone else's"


def test_rank_existing_false_keeps_but_does_not_rank_an_earlier_run(tmp_path: Path) -> None:
    first = manager(tmp_path, keep_best=1)
    for epoch, loss in enumerate([0.2, 0.1], 1):
        first.epoch_end(epoch, b"old", metrics={"val_loss": loss})
    fresh = manager(tmp_path, filename="new{epoch}.bin", keep_best=1, save_best_only=True,
                    rank_existing=False)
    assert fresh.best is None and [c.name for c in fresh.checkpoints] == ["m2.bin"]
    assert fresh.epoch_end(1, b"new", metrics={"val_loss": 0.9}) is not None  # first of its run
    fresh.epoch_end(2, b"new", metrics={"val_loss": 0.8})
    assert fresh.best is not None and fresh.best.name == "new2.bin"
    assert visible(tmp_path) == ["m2.bin", "new2.bin"]  # the earlier run's file stays
    resumed = manager(tmp_path, keep_best=1)  # rank_existing=True (the default): a resume
    assert resumed.best is not None and resumed.best.name == "m2.bin"


def test_cli_lists_verifies_and_inspects_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mgr = manager(tmp_path)
    mgr.epoch_end(1, b"one", metrics={"val_loss": 0.5})
    mgr.epoch_end(2, b"two!", metrics={"val_loss": 0.4})
    capsys.readouterr()
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(r["name"], r["epoch"], r["best"], r["latest"]) for r in rows] == [
        ("m1.bin", 1, False, False), ("m2.bin", 2, True, True)]
    assert main(["verify", str(tmp_path)]) == 0
    assert "2 verified, 0 failed" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m2.bin")]) == 0
    out = capsys.readouterr().out
    assert "epoch       2" in out and "1 file: m2.bin (4 B)" in out
    (tmp_path / "m1.bin").write_bytes(b"onE")  # same length, other bytes
    assert main(["verify", str(tmp_path / "m1.bin")]) == 1
    assert "file checksum does not match" in capsys.readouterr().out
    with pytest.raises(ChecksumMismatchError):
        verify_file(open_store(tmp_path), "m1.bin")


def test_object_store_files(tmp_path: Path) -> None:
    url = f"memory://payload-{os.getpid()}"
    with manager(url, keep_last=1, async_save=True) as mgr:
        mgr.epoch_end(1, b"one", metrics={"val_loss": 0.5})
        mgr.epoch_end(2, b"two", metrics={"val_loss": 0.4})
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url, detail=False))
    assert names == [".ckpt-index.msgpack", sidecar("m2.bin"), "m2.bin"]
    assert fs.cat_file(f"{url}/m2.bin") == b"two"
    verify_file(open_store(url), "m2.bin")
    assert [c.name for c in manager(url).checkpoints] == ["m2.bin"]


@pytest.mark.parametrize(("kw", "message"), [
    ({"payload": "not callable"}, "not callable"),
    ({"filename": None}, "needs filename="),
    ({"replica": "memory://elsewhere"}, "replica="),
])
def test_bad_payload_options(tmp_path: Path, kw: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        manager(tmp_path, **kw)


def test_restore_says_a_file_checkpoint_is_the_frameworks_to_read(tmp_path: Path) -> None:
    """restore() reads state checkpoints: a payload writer's file is neither "broken" nor
    loaded; with a state checkpoint beside it, "latest" skips the file and restores that."""
    import warnings

    def writer(state: Any, path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"weights")

    with CheckpointManager(tmp_path / "only", payload=writer, filename="model.bin") as files:
        files.save(object(), step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "broken; falling back"
        for which in ("latest", "model.bin"):
            with pytest.raises(CheckpointNotFoundError, match="read it with that framework"):
                CheckpointManager(tmp_path / "only").restore(which)
    with CheckpointManager(tmp_path / "both") as mgr:
        mgr.save({"w": np.arange(3)}, step=0)
    with CheckpointManager(tmp_path / "both", payload=writer, filename="model.bin") as files:
        files.save(object(), step=1)  # the newest is the file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = CheckpointManager(tmp_path / "both").restore("latest")
    assert got.info.step == 0 and got.state["w"].tolist() == [0, 1, 2]
