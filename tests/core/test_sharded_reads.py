"""Resharding reads: only the rows a process asks for are read, and they are verified.

Pieces of sharded arrays carry a crc32c per block (format.BLOCK_BYTES, made small here),
so a restore onto another sharding reads the byte range it needs, widened to whole blocks,
and verifies exactly what it read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from _ckpt_files import _manifest, _put_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpointer
from checkpointer import CheckpointManager
from checkpointer import format as fmt
from checkpointer.checksum import block_crcs, crc32c, crc_of_blocks
from checkpointer.errors import ChecksumMismatchError, ManifestError
from checkpointer.sharding import Shard, ShardedArray, ShardSpec
from checkpointer.storage import LocalStore

BLOCK = 4096


@given(data=st.binary(max_size=5 * BLOCK + 100), block=st.sampled_from([1, 7, 64, BLOCK]))
def test_block_checksums_and_the_whole_come_from_one_pass(data, block):
    whole, blocks = block_crcs(memoryview(data), block)
    assert whole == crc32c(data)  # combined from the blocks' crcs
    assert list(blocks) == [crc32c(data[i:i + block]) for i in range(0, len(data), block)]
    assert crc_of_blocks(blocks, block, len(data)) == whole


def test_a_wrong_block_checksum_fails_a_full_load_and_the_reads_of_that_block(tmp_path):
    full = np.arange(128 * 64, dtype=np.float32).reshape(128, 64)  # 16 KiB pieces: 4 blocks
    name = save(tmp_path, full, [64])
    m = _manifest(tmp_path / name)
    m["blocks"]["x@64.0"][2] ^= 1
    _put_manifest(tmp_path / name, m)  # a consistent manifest, with a wrong block checksum
    with pytest.raises(ChecksumMismatchError, match="block checksums of 'x@64.0'"):
        checkpointer.load(tmp_path / name)
    with pytest.raises(ChecksumMismatchError, match="block 2"):
        restore(tmp_path, full, [((96, 0), (32, 64))])
    assert np.array_equal(restore(tmp_path, full, [((64, 0), (32, 64))])[0], full[64:96])  # blocks 0-1


def sharded(full: np.ndarray, cuts: list[int]) -> ShardedArray:
    """``full`` as row pieces starting at each of ``cuts`` (one process holding them all)."""
    bounds = [0, *cuts, full.shape[0]]
    shards = tuple(Shard((a, *([0] * (full.ndim - 1))), full[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    return ShardedArray(full.shape, full.dtype, shards)


def save(directory: Path, full: np.ndarray, cuts: list[int]) -> str:
    with mock.patch.object(fmt, "BLOCK_BYTES", BLOCK):
        mgr = CheckpointManager(directory)
        return mgr.save({"x": sharded(full, cuts), "step": 1}, step=1).name


def restore(directory: Path, full: np.ndarray, boxes: list[tuple[tuple[int, ...], tuple[int, ...]]],
            verify: bool = True) -> list[np.ndarray]:
    spec = ShardSpec(full.shape, full.dtype, tuple(boxes))
    state = CheckpointManager(directory).restore("latest", template={"x": spec}, verify=verify,
                                                 fallback=False).state
    return [s.data for s in state["x"].shards]


@contextlib.contextmanager
def bytes_read() -> Any:
    """Count the bytes read from data files."""
    count = {"n": 0}
    real = LocalStore.open_read

    class Counting:
        def __init__(self, f: Any) -> None:
            self.f = f

        def read(self, *a: Any) -> bytes:
            out: bytes = self.f.read(*a)
            count["n"] += len(out)
            return out

        def readinto(self, b: Any) -> int:
            n: int = self.f.readinto(b)
            count["n"] += n
            return n

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

    def open_read(store: LocalStore, rel: str) -> Any:
        f = real(store, rel)
        return Counting(f) if rel.endswith(".safetensors") else f

    with mock.patch.object(LocalStore, "open_read", open_read):
        yield count


def test_a_reshard_reads_only_the_rows_it_needs_and_whole_blocks(tmp_path):
    full = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)  # rows of 1 KiB, 64 KiB pieces
    name = save(tmp_path, full, [64, 128, 192])
    data = (tmp_path / name / "data-00000.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")  # read once per opening of the file
    needed = 85 * 1024
    with bytes_read() as count:  # rows 85..170 of 256: parts of two pieces
        got = restore(tmp_path, full, [((85, 0), (85, 256))])
    assert np.array_equal(got[0], full[85:170])
    assert 0 <= count["n"] - header - needed < 2 * BLOCK  # at most a block at each end
    with bytes_read() as count:
        assert np.array_equal(restore(tmp_path, full, [((85, 0), (85, 256))], verify=False)[0], full[85:170])
    assert count["n"] == header + needed  # unverified: the rows alone
    # a box cutting columns too: the rows of the pieces are read, then copied
    with bytes_read() as count:
        got = restore(tmp_path, full, [((85, 3), (85, 100))])
    assert np.array_equal(got[0], full[85:170, 3:103])
    assert 0 <= count["n"] - 2 * header - needed < 2 * BLOCK


def test_damage_in_the_rows_read_is_detected_and_outside_them_it_is_not_read(tmp_path):
    full = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    name = save(tmp_path, full, [128])
    m = _manifest(tmp_path / name)
    first = next(t for t in m["tensors"] if t[0] == "x@0.0")  # the piece at row 0
    path = tmp_path / name / first[1]
    data = bytearray(path.read_bytes())
    data[first[4] + 100 * 1024 + 5] ^= 0x01  # inside row 100 of the first piece
    path.write_bytes(bytes(data))
    assert np.array_equal(restore(tmp_path, full, [((0, 0), (64, 256))])[0], full[:64])  # not read
    with pytest.raises(ChecksumMismatchError, match="block 25"):
        restore(tmp_path, full, [((96, 0), (16, 256))])
    with pytest.raises(ChecksumMismatchError):
        checkpointer.load(tmp_path / name)  # a full load checks the whole piece


def test_pieces_without_block_checksums_are_read_whole_and_verified(tmp_path):
    full = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # 8 KiB pieces
    with mock.patch.object(fmt, "BLOCK_BYTES", 1 << 20):  # larger than any piece: no blocks
        CheckpointManager(tmp_path).save({"x": sharded(full, [32]), "step": 1}, step=1)
    assert "blocks" not in _manifest(tmp_path / "step-000000001")
    with bytes_read() as count:
        assert np.array_equal(restore(tmp_path, full, [((10, 0), (4, 64))])[0], full[10:14])
    assert count["n"] >= 32 * 64 * 4


@pytest.mark.parametrize("patch", [
    lambda m: m.update(block_bytes=100),
    lambda m: m.update(block_bytes=2**40),
    lambda m: m.update(blocks=[1, 2]),
    lambda m: m["blocks"].update({"nope": [1]}),
    lambda m: m["blocks"].update({k: v[:-1] for k, v in m["blocks"].items()}),
    lambda m: m["blocks"].update({k: [-1] * len(v) for k, v in m["blocks"].items()}),
    lambda m: m["blocks"].update({k: [str(c) for c in v] for k, v in m["blocks"].items()}),
    lambda m: m.pop("block_bytes"),
])
def test_malformed_block_checksums_are_refused(tmp_path, patch):
    full = np.arange(128 * 64, dtype=np.float32).reshape(128, 64)
    name = save(tmp_path, full, [64])
    m = _manifest(tmp_path / name)
    assert m["block_bytes"] == BLOCK and len(m["blocks"]) == 2
    patch(m)
    _put_manifest(tmp_path / name, m)
    with pytest.raises(ManifestError):
        checkpointer.load(tmp_path / name)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_box_of_any_row_sharding_restores_exactly(tmp_path_factory, data):
    rows = data.draw(st.integers(1, 200), label="rows")
    rest = data.draw(st.one_of(st.just(()), st.tuples(st.integers(0, 600)),
                               st.tuples(st.integers(0, 40), st.integers(0, 40))), label="other dims")
    shape = (rows, *rest)
    dtype = data.draw(st.sampled_from([np.float32, np.int8, np.float64, np.uint16]))
    full = (np.arange(int(np.prod(shape))) % 251).astype(dtype).reshape(shape)
    cuts = sorted(data.draw(st.sets(st.integers(1, rows - 1), max_size=4), label="cuts")) if rows > 1 else []
    boxes = []
    for _ in range(data.draw(st.integers(1, 3), label="boxes")):
        lo = [data.draw(st.integers(0, d)) for d in shape]
        hi = [data.draw(st.integers(a, d)) for a, d in zip(lo, shape, strict=True)]
        if data.draw(st.booleans(), label="whole rows"):  # read straight into the box
            lo[1:], hi[1:] = [0] * len(rest), list(rest)
        boxes.append((tuple(lo), tuple(b - a for a, b in zip(lo, hi, strict=True))))
    if data.draw(st.booleans(), label="a box twice"):  # replicated devices of one process
        boxes.append(boxes[0])
    verify = data.draw(st.booleans(), label="verify")
    directory = tmp_path_factory.mktemp("reshard")
    save(directory, full, cuts)
    got = restore(directory, full, boxes, verify=verify)
    for (o, n), arr in zip(boxes, got, strict=True):
        assert np.array_equal(arr, full[tuple(slice(a, a + b) for a, b in zip(o, n, strict=True))])


def test_many_boxes_read_through_block_checksums(tmp_path):
    """Pieces of 24 to 100 KiB (6 to 25 blocks) and boxes cutting them anywhere, half of
    them whole rows (read straight into the box), half not (read, then copied)."""
    rng = np.random.default_rng(0)
    full = rng.standard_normal((300, 50)).astype(np.float64)  # rows of 400 bytes
    save(tmp_path, full, [61, 120, 250])
    for i in range(60):
        lo = [int(rng.integers(0, d)) for d in full.shape]
        hi = [int(rng.integers(a + 1, d + 1)) for a, d in zip(lo, full.shape, strict=True)]
        if i % 2:  # whole rows: read straight into the box
            lo[1], hi[1] = 0, full.shape[1]
        box = (tuple(lo), tuple(b - a for a, b in zip(lo, hi, strict=True)))
        got = restore(tmp_path, full, [box])[0]
        assert np.array_equal(got, full[lo[0]:hi[0], lo[1]:hi[1]])
