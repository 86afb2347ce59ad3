"""Copying a committed checkpoint to another store, verified while it streams."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.errors import CheckpointNotFoundError, ChecksumMismatchError, TruncatedFileError
from checkpointer.load import load_checkpoint, verify_checkpoint
from checkpointer.manifest import read_manifest
from checkpointer.replica import copy_checkpoint
from checkpointer.sharding import Shard, ShardedArray, ShardSpec
from checkpointer.storage import open_store


def _state() -> dict[str, object]:
    full = np.arange(256 * 64, dtype=np.float32).reshape(256, 64)  # 64 KiB pieces: block checksums
    pieces = tuple(Shard((a, 0), full[a:a + 128]) for a in (0, 128))
    return {"w": np.arange(1000, dtype=np.int64), "b": np.ones((3, 0)), "half": np.arange(5, dtype=np.float16),
            "sharded": ShardedArray(full.shape, full.dtype, pieces), "step": 7, "name": "run"}


def _dst(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "replica") if kind == "local" else f"memory://replica-{uuid.uuid4().hex}"


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_copy_is_the_same_checkpoint(tmp_path: Path, kind: str) -> None:
    mgr = CheckpointManager(tmp_path / "local", monitor="loss")
    info = mgr.save(_state(), step=7, metrics={"loss": 0.5})
    src, dst = open_store(str(tmp_path / "local")), open_store(_dst(kind, tmp_path))
    copied = copy_checkpoint(src, info.name, dst)
    assert copied.nbytes > 0
    verify_checkpoint(dst, info.name)
    tree, manifest = load_checkpoint(dst, info.name)
    original, _ = load_checkpoint(src, info.name)
    assert tree["step"] == 7 and tree["name"] == "run"
    for key in ("w", "b", "half"):
        assert np.array_equal(tree[key], original[key]) and tree[key].dtype == original[key].dtype
    assert np.array_equal(tree["sharded"], original["sharded"])
    src_m = read_manifest(src, info.name)
    assert manifest.fields == src_m.fields and manifest.tree == src_m.tree
    assert [t.blocks for t in manifest.tensors] == [t.blocks for t in src_m.tensors]
    part, _ = load_checkpoint(dst, info.name, specs={"sharded": ShardSpec((256, 64), np.dtype(np.float32), (((128, 0), (128, 64)),))})
    assert np.array_equal(part["sharded"].shards[0].data, original["sharded"][128:])
    # the replica is an ordinary checkpoint directory
    there = CheckpointManager(_dst(kind, tmp_path) if kind == "local" else dst.url, monitor="loss")
    assert [c.name for c in there.checkpoints] == [info.name] and there.best is not None


def test_a_copy_replaces_an_older_one_of_that_name(tmp_path: Path) -> None:
    src, dst = open_store(str(tmp_path / "a")), open_store(str(tmp_path / "b"))
    checkpointer.save(tmp_path / "a" / "c", {"v": np.zeros(4)})
    copy_checkpoint(src, "c", dst)
    checkpointer.save(tmp_path / "a" / "c", {"v": np.ones(4)})
    copy_checkpoint(src, "c", dst)
    assert np.array_equal(checkpointer.load(tmp_path / "b" / "c")["v"], np.ones(4))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["c"]


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_damaged_source_stops_the_copy_and_nothing_shows(tmp_path: Path, kind: str) -> None:
    checkpointer.save(tmp_path / "a" / "c", {"v": np.arange(100_000, dtype=np.float64)})
    data = next((tmp_path / "a" / "c").glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    src, dst = open_store(str(tmp_path / "a")), open_store(_dst(kind, tmp_path))
    with pytest.raises(ChecksumMismatchError, match="'v' does not match"):
        copy_checkpoint(src, "c", dst)
    assert [p for p in dst.list_files() if not p.startswith(".")] == []
    data.write_bytes(bytes(raw[:-100]))
    with pytest.raises(TruncatedFileError):
        copy_checkpoint(src, "c", dst)
    with pytest.raises(CheckpointNotFoundError):
        copy_checkpoint(src, "missing", dst)
    assert [p for p in dst.list_files() if not p.startswith(".")] == []
