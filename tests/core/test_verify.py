"""``verify_checkpoint`` / ``checkpointer verify``: every checksum, in bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager, errors
from checkpointer.cli import main
from checkpointer.load import verify_checkpoint
from checkpointer.manifest import read_manifest
from checkpointer.sharding import Shard, ShardedArray
from checkpointer.storage import open_store

MiB = 1 << 20


def _big(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    state = {"a": rng.standard_normal(6 * MiB, dtype=np.float32),  # 24 MiB
             "b": rng.integers(0, 255, 20 * MiB, dtype=np.uint8), "small": np.arange(7)}
    checkpointer.save(tmp_path / "big", state)
    return tmp_path / "big"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_verify_streams_in_bounded_memory(tmp_path: Path) -> None:
    ckpt = _big(tmp_path)
    store = open_store(tmp_path)
    tracemalloc.start()
    try:
        manifest = verify_checkpoint(store, "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest.nbytes > 44 * MiB
    assert peak < 20 * MiB, f"verify of a {manifest.nbytes >> 20} MiB checkpoint peaked at {peak >> 20} MiB"
    assert sum(f.stat().st_size for f in ckpt.iterdir()) > 44 * MiB


@pytest.mark.parametrize("where", ["start of a", "end of b", "header"])
def test_verify_finds_one_flipped_byte(tmp_path: Path, where: str) -> None:
    ckpt = _big(tmp_path)
    m = read_manifest(open_store(tmp_path), "big")
    rows = {t.key: t for t in m.tensors}
    offset = {"start of a": rows["a"].begin, "end of b": rows["b"].end - 1, "header": 20}[where]
    _flip(ckpt / rows["a"].file, offset)
    with pytest.raises(errors.CorruptCheckpointError, match="data-00000"):
        verify_checkpoint(open_store(tmp_path), "big")
    assert main(["verify", str(ckpt)]) == 1


def _sharded(tmp_path: Path) -> tuple[Path, str]:
    full = np.random.default_rng(1).standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB
    pieces = (Shard((0, 0), full[:1536]), Shard((1536, 0), full[1536:]))
    with CheckpointManager(tmp_path) as mgr:
        name = mgr.save({"x": ShardedArray(full.shape, full.dtype, pieces)}, step=1).name
    return tmp_path / name, name


def test_verify_checks_each_block_of_a_piece(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, name = _sharded(tmp_path)
    m = read_manifest(open_store(tmp_path), name)
    piece = next(t for t in m.tensors if t.blocks)
    assert len(piece.blocks) == 2 and m.block_bytes == 4 * MiB
    assert verify_checkpoint(open_store(tmp_path), name) == m
    _flip(ckpt / piece.file, piece.begin + 5 * MiB)  # in its second block
    with pytest.raises(errors.ChecksumMismatchError, match="block 1"):
        verify_checkpoint(open_store(tmp_path), name)
    assert main(["verify", str(tmp_path)]) == 1
    assert "0 verified, 1 failed" in capsys.readouterr().out


def test_verify_accepts_what_load_accepts(tmp_path: Path) -> None:
    ckpt = _big(tmp_path)
    assert main(["verify", str(ckpt)]) == 0
    loaded = checkpointer.load(ckpt)
    assert loaded["small"].tolist() == list(range(7))
