"""Checksums of an eager load while the next chunk is read: many small tensors (checked in
batches on the helper thread) and a big one (one chain), with and without a spare core.
Every byte is checked: a flipped one anywhere names its tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import errors, reading
from checkpointer.errors import ChecksumMismatchError
from checkpointer.manifest import read_manifest
from checkpointer.storage import open_store


def state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"small{i:04d}": rng.standard_normal(2500 + i % 7, dtype=np.float32) for i in range(2000)}
    out["zbig"] = rng.standard_normal(5_000_000, dtype=np.float32)  # 20 MB: a run of its own
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    path = str(tmp_path_factory.mktemp("pipe") / "ckpt")
    st = state()
    checkpointer.save(path, st)
    return path, st


def flipped(path: str, key: str, at: int, tmp: Path) -> Path:
    """A copy of ``path`` with one byte of tensor ``key`` flipped (``at``: its offset)."""
    out = tmp / "flipped"
    shutil.copytree(path, out)
    row = next(t for t in read_manifest(open_store(tmp), "flipped").tensors if t.key == key)
    with open(out / row.file, "r+b") as f:
        f.seek(row.begin + at)
        b = f.read(1)
        f.seek(row.begin + at)
        f.write(bytes([b[0] ^ 0x40]))
    return out


@pytest.mark.parametrize("spare_core", [True, False], ids=["helper-thread", "inline"])
def test_a_load_is_bit_exact(saved, monkeypatch, spare_core):
    monkeypatch.setattr(reading, "_SPARE_CORE", spare_core)
    path, st = saved
    got = checkpointer.load(path)
    assert set(got) == set(st)
    assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype for k, v in st.items())


@pytest.mark.parametrize("spare_core", [True, False], ids=["helper-thread", "inline"])
@pytest.mark.parametrize("key,at", [("small0000", 0), ("small1500", 4321), ("small1999", 10_000),
                                    ("zbig", 0), ("zbig", 12_345_678), ("zbig", 19_999_999)])
def test_a_flipped_byte_anywhere_names_its_tensor(saved, tmp_path, monkeypatch, spare_core, key, at):
    monkeypatch.setattr(reading, "_SPARE_CORE", spare_core)
    bad = flipped(saved[0], key, at, tmp_path)
    with pytest.raises(ChecksumMismatchError, match=f"tensor '{key}' fails its crc32c"):
        checkpointer.load(bad)
    assert checkpointer.load(bad, verify=False)  # the bytes are there: only the check refuses


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) in the header of the data file at ``path``."""
    assert len(old) == len(new)
    data = next(path.glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    at = raw.index(old, 8, 8 + n)
    raw[at:at + len(old)] = new
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("old,new,error", [
    (b'"dtype":"F32","shape":[4]', b'"dtype":"Q32","shape":[4]', "UnsupportedDtypeError"),
    (b'"dtype":"F32","shape":[4]', b'"dtype":"F32","shape":[5]', "InvalidOffsetsError"),
    (b'"dtype":"F32","shape":[4]', b'"dtype":"I32","shape":[4]', "ManifestError"),
    (b'"shape":[4]', b'"shape":[4,', "HeaderError"),
])
def test_a_header_unlike_the_manifest_gets_the_error_that_names_it(tmp_path, old, new, error):
    """Headers that list exactly the manifest's rows skip the per-entry checks; any other
    is checked entry by entry, so the error says what is wrong."""
    path = tmp_path / "c"
    checkpointer.save(path, {"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int64)})
    _edit_header(path, old, new)
    with pytest.raises(errors.CheckpointError) as got:
        checkpointer.load(path, verify=False)
    assert type(got.value).__name__ == error


@pytest.mark.parametrize("meta,error", [
    (b'{"f":"","f":""}', "DuplicateKeyError"),  # a duplicate key the fast parse would not see
    (b'{"f":"","g":""}', None),                 # the fast path
    (b'{"format":"::"}', None),                 # ":" inside a string: the full parse
    (b'{"format":1234}', None),                 # not str: the full parse (which ignores metadata)
])
def test_duplicate_keys_are_refused_on_the_fast_path_too(tmp_path, meta, error):
    path = tmp_path / "c"
    st = {"a": np.arange(4, dtype=np.float32), "b": np.arange(3, dtype=np.int64)}
    checkpointer.save(path, st)
    _edit_header(path, b'{"format":"pt"}', meta)
    for verify in (False, True):
        if error is None:
            got = checkpointer.load(path, verify=False)
            assert all(np.array_equal(got[k], v) for k, v in st.items())
        else:
            with pytest.raises(errors.CheckpointError) as got_error:
                checkpointer.load(path, verify=verify)
            assert type(got_error.value).__name__ == error
