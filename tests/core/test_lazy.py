"""checkpointer.open: open a checkpoint and read single tensors without the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import checkpointer
from checkpointer import errors, reader
from checkpointer.frame import decode_framed, encode_framed
from checkpointer.manifest import MANIFEST_NAME
from checkpointer.reader import LazyTensor
from checkpointer.reader import open as ck_open


def _state() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    return {
        "model": {
            "w": rng.standard_normal((64, 32), dtype=np.float32),
            "b": np.arange(7, dtype=np.int64),
            "bf": np.ones(5, dtype=ml_dtypes.bfloat16),
        },
        "opt": [np.zeros((0, 4)), (np.array(3.5), "adam")],
        "step": 10,
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    checkpointer.save(tmp_path / "c", _state())
    return tmp_path / "c"


def test_keys_tensor_and_eager_state(ckpt: Path) -> None:
    with ck_open(ckpt) as r:
        assert sorted(r.keys()) == sorted(["model/w", "model/b", "model/bf", "opt/0", "opt/1/0"])
        assert "model/w" in r and len(r) == 5
        np.testing.assert_array_equal(r.tensor("model/w"), _state()["model"]["w"])
        assert r.tensor("model/bf").dtype == ml_dtypes.bfloat16
        assert r.info("opt/0").shape == (0, 4)
        full = r.state()
        np.testing.assert_array_equal(full["model"]["b"], np.arange(7))
        assert full["opt"][1][1] == "adam" and full["step"] == 10


def test_lazy_state_reads_on_demand(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    real = reader.read_tensors

    def spy(f: Any, entries: Any, *a: Any, **k: Any) -> Any:
        entries = list(entries)
        reads.extend(e.key for e in entries)
        return real(f, entries, *a, **k)

    monkeypatch.setattr(reader, "read_tensors", spy)
    with ck_open(ckpt) as r:
        tree = r.state(lazy=True)
        assert reads == []
        leaf = tree["model"]["b"]
        assert isinstance(leaf, LazyTensor) and leaf.nbytes == 56
        np.testing.assert_array_equal(leaf.load(), np.arange(7))
        np.testing.assert_array_equal(np.asarray(tree["opt"][1][0]), np.array(3.5))
        assert reads == ["model/b", "opt/1/0"]
        assert isinstance(tree["opt"], list) and isinstance(tree["opt"][1], tuple)


def _flip_byte_of(ckpt: Path, key: str) -> None:
    with ck_open(ckpt) as r:
        t = next(x for x in r.manifest.tensors if x.key == key)
    path = ckpt / t.file
    data = bytearray(path.read_bytes())
    data[t.begin] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_tensor_detected_others_still_readable(ckpt: Path) -> None:
    _flip_byte_of(ckpt, "model/b")
    with ck_open(ckpt) as r:
        with pytest.raises(errors.ChecksumMismatchError, match="model/b"):
            r.tensor("model/b")
        assert r.tensor("model/b", verify=False).shape == (7,)
        np.testing.assert_array_equal(r.tensor("model/w"), _state()["model"]["w"])
        with pytest.raises(errors.ChecksumMismatchError):
            r.state()


def test_truncated_file_and_missing_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    data = next(ckpt.glob("*.safetensors"))
    data.write_bytes(data.read_bytes()[:-4])
    with ck_open(ckpt) as r, pytest.raises(errors.TruncatedFileError):
        r.tensor("model/w")
    with pytest.raises(errors.CheckpointNotFoundError):
        ck_open(tmp_path / "nope")
    with ck_open(ckpt) as r, pytest.raises(KeyError):
        r.tensor("nope")


def test_hostile_manifest_range_refused_before_allocation(ckpt: Path) -> None:
    from checkpointer.manifest import MANIFEST_MAGIC

    m = decode_framed((ckpt / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    for t in m["tensors"]:
        if t[0] == "model/w":
            t[3] = [1 << 40, 1 << 20]
            t[5] = t[4] + (1 << 62)
    (ckpt / MANIFEST_NAME).write_bytes(encode_framed(MANIFEST_MAGIC, m))
    with pytest.raises(errors.CorruptCheckpointError), ck_open(ckpt) as r:  # refused on open
        r.tensor("model/w")
    for t in m["tensors"]:
        if t[0] == "model/w":
            t[3], t[5] = [0, 1 << 62], t[4]  # zero bytes, yet a shape numpy refuses
    (ckpt / MANIFEST_NAME).write_bytes(encode_framed(MANIFEST_MAGIC, m))
    with pytest.raises(errors.CorruptCheckpointError), ck_open(ckpt) as r:
        r.tensor("model/w")
    for t in m["tensors"]:
        if t[0] == "model/w":
            t[3], t[4], t[5] = [64, 32], 1 << 30, (1 << 30) + 8192  # beyond the end of the file
    (ckpt / MANIFEST_NAME).write_bytes(encode_framed(MANIFEST_MAGIC, m))
    with ck_open(ckpt) as r, pytest.raises(errors.InvalidOffsetsError):
        r.tensor("model/w")


def test_memory_store(tmp_path: Path) -> None:
    url = "memory://lazy-test/c"
    checkpointer.save(url, _state())
    with ck_open(url) as r:
        np.testing.assert_array_equal(r.tensor("model/b"), np.arange(7))
