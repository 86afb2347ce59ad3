"""Uploads to ``s3://`` (``checkpointer.s3_upload``) against a moto server on 127.0.0.1: one
PUT below the multipart threshold, parallel parts above it, the object appearing only when
the upload completes, and nothing left behind by an upload that failed or was abandoned."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pytest
from _checks import multipart_leftovers
from _relcommon import CHECKSUM_MODES, s3_options

import checkpointer
from checkpointer import CheckpointError, s3_upload
from checkpointer.s3_upload import ParallelUpload, SinglePut
from checkpointer.storage import open_store

MiB = 1 << 20


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The S3 API calls s3fs makes, by name."""
    import s3fs

    seen: Counter[str] = Counter()
    real = s3fs.S3FileSystem._call_s3

    async def counted(self: Any, method: str, *args: Any, **kw: Any) -> Any:
        seen[method] += 1
        return await real(self, method, *args, **kw)

    sync_real = s3fs.S3FileSystem.call_s3  # its own wrapper of the original coroutine

    def sync_counted(self: Any, method: str, *args: Any, **kw: Any) -> Any:
        seen[method] += 1
        return sync_real(self, method, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", sync_counted)
    return seen


def _data(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("checksum", list(CHECKSUM_MODES))
def test_parallel_parts_make_one_whole_object(s3_dir: str, s3_endpoint: str, checksum: str,
                                              calls: Counter[str]) -> None:
    store = open_store(s3_dir, s3_options(s3_endpoint, checksum))
    fs = store.fs  # type: ignore[attr-defined]
    data = _data(23 * MiB + 12345)
    up = ParallelUpload(fs, store.path("obj"), part_bytes=5 * MiB, in_flight=2)
    view = memoryview(data)
    for at in range(0, len(data), 3 * MiB + 7):  # writes that do not line up with the parts
        up.write(view[at:at + 3 * MiB + 7])
    assert not fs.exists(store.path("obj"))  # nothing shows before the upload completes
    up.close()
    assert fs.cat_file(store.path("obj")) == data
    assert calls["upload_part"] == 5 and calls["complete_multipart_upload"] == 1
    assert not multipart_leftovers(store)


@pytest.mark.parametrize("checksum", list(CHECKSUM_MODES))
def test_a_single_put_sends_its_buffer_once_at_close(s3_dir: str, s3_endpoint: str, checksum: str,
                                                     calls: Counter[str]) -> None:
    store = open_store(s3_dir, s3_options(s3_endpoint, checksum))
    fs = store.fs  # type: ignore[attr-defined]
    data = _data(3 * MiB + 4321, seed=2)
    up = SinglePut(fs, store.path("one"))
    view = memoryview(data)
    for at in range(0, len(data), 700_001):
        assert up.write(view[at:at + 700_001]) == len(view[at:at + 700_001])
    up.write(np.arange(3, dtype=np.int32))  # any buffer, as bytes
    assert not fs.exists(store.path("one")) and calls["put_object"] == 0
    up.close()
    up.close()  # a second close sends nothing more
    assert fs.cat_file(store.path("one")) == data + np.arange(3, dtype=np.int32).tobytes()
    assert calls["put_object"] == 1 and calls["create_multipart_upload"] == 0
    with pytest.raises(ValueError, match="after close"):
        up.write(b"late")
    gone = SinglePut(fs, store.path("never"))
    gone.write(b"some bytes")
    gone.discard()
    assert not fs.exists(store.path("never")) and calls["put_object"] == 1


def test_a_discarded_or_failing_upload_leaves_nothing(s3_dir: str, s3_endpoint: str) -> None:
    store = open_store(s3_dir, s3_options(s3_endpoint))
    fs = store.fs  # type: ignore[attr-defined]
    up = ParallelUpload(fs, store.path("gone"), part_bytes=5 * MiB, in_flight=2)
    up.write(_data(12 * MiB))  # two parts under way
    up.discard()
    assert not fs.exists(store.path("gone")) and not multipart_leftovers(store)
    with pytest.raises(CheckpointError, match="bucket does not exist"):  # through the store
        with open_store("s3://no-such-bucket-here/x", s3_options(s3_endpoint)).writer("f", 200 * MiB) as w:
            w.write(_data(20 * MiB))
    with pytest.raises(KeyboardInterrupt):  # an interrupt mid-write aborts the upload
        with store.writer("cut", 200 * MiB) as w:
            w.write(_data(17 * MiB))
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # and a single PUT's: nothing is sent
        with store.writer("cut-small", MiB) as w:
            w.write(_data(MiB))
            raise KeyboardInterrupt
    assert not fs.exists(store.path("cut-small"))
    assert not fs.exists(store.path("cut")) and not multipart_leftovers(store)


def test_saves_take_one_put_below_the_threshold_and_parallel_parts_above(
        s3_dir: str, s3_endpoint: str, calls: Counter[str], monkeypatch: pytest.MonkeyPatch) -> None:
    opts = s3_options(s3_endpoint)
    small = {"w": np.arange(2 * MiB, dtype=np.float32)}  # 8 MiB: one PUT per data file
    checkpointer.save(f"{s3_dir}/small", small, storage_options=opts)
    assert calls["create_multipart_upload"] == 0 and calls["put_object"] == 2  # data, manifest
    monkeypatch.setattr(s3_upload, "SINGLE_PUT_BYTES", 10 * MiB)
    monkeypatch.setattr(s3_upload, "PART_BYTES", 5 * MiB)
    rng = np.random.default_rng(1)
    big = {"a": rng.standard_normal(3 * MiB, dtype=np.float32), "b": rng.integers(0, 9, 5 * MiB, dtype=np.int8)}
    calls.clear()
    checkpointer.save(f"{s3_dir}/big", big, storage_options=opts)
    assert calls["create_multipart_upload"] == 1 and calls["upload_part"] == 4  # 17 MiB and a header
    got = checkpointer.load(f"{s3_dir}/big", storage_options=opts)  # every checksum verified
    assert all(np.array_equal(got[k], v) for k, v in big.items())
    assert not multipart_leftovers(open_store(s3_dir, opts))
    assert os.environ.get("AWS_ACCESS_KEY_ID") == "testing"  # the server's, never a real account


def test_a_save_lists_its_own_folder_not_every_checkpoint_beside_it(
        s3_dir: str, s3_endpoint: str, calls: Counter[str]) -> None:
    opts = s3_options(s3_endpoint)
    state = {"w": np.arange(1000, dtype=np.float32)}
    counts = []
    for i in range(6):
        calls.clear()
        checkpointer.save(f"{s3_dir}/ck{i}", state, storage_options=opts)
        counts.append(calls["list_objects_v2"])
    assert counts[-1] == counts[1] <= 2, counts  # six checkpoints side by side: no more listings
    open_store(s3_dir, opts).put_bytes("plain", b"x")
    with pytest.raises(CheckpointError, match="not a checkpoint"):  # a file of that name stays
        checkpointer.save(f"{s3_dir}/plain", state, storage_options=opts)
    assert open_store(s3_dir, opts).read_bytes("plain") == b"x"
