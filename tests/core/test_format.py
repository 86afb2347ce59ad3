"""Format v1: standard safetensors files, and hostile input refused with the specific error."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from _ckpt_files import _manifest, _put_manifest, _valid
from safetensors import safe_open

import checkpointer
from checkpointer import errors
from checkpointer.checksum import crc32c
from checkpointer.manifest import MANIFEST_NAME

DATA = "data-00000.safetensors"


def _state() -> dict[str, Any]:
    return {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "i64": np.array([-1, 2**40]),
        "u8": np.arange(5, dtype=np.uint8),
        "bool": np.array([True, False]),
        "f16": np.array([1.5, -2.0], np.float16),
        "c64": np.array([1 + 2j], np.complex64),
        "bf16": np.array([1.5, -3.25, np.nan], dtype=ml_dtypes.bfloat16),
        "e4m3": np.array([1.0, -2.0], dtype=ml_dtypes.float8_e4m3fn),
        "e5m2": np.array([0.5, 4.0], dtype=ml_dtypes.float8_e5m2),
        "nested": {"a/b": np.ones((2, 2), np.float64).T},
        "step": 7,
        "name": "run",
    }


def _as_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    if dtype.itemsize == 2 and dtype.kind == "V" or dtype == np.dtype(ml_dtypes.bfloat16):
        return t.view(torch.int16).numpy().view(dtype)
    if dtype in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)):
        return t.view(torch.uint8).numpy().view(dtype)
    return t.numpy()


def test_files_open_with_plain_safetensors(tmp_path: Path) -> None:
    state = _state()
    checkpointer.save(tmp_path / "c", state)
    path = str(tmp_path / "c" / DATA)
    flat = {
        "f32": state["f32"],
        "i64": state["i64"],
        "u8": state["u8"],
        "bool": state["bool"],
        "f16": state["f16"],
        "c64": state["c64"],
        "bf16": state["bf16"],
        "e4m3": state["e4m3"],
        "e5m2": state["e5m2"],
        "nested/a~1b": state["nested"]["a/b"],
    }
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(flat)
        for key, want in flat.items():
            got = _as_numpy(f.get_tensor(key), want.dtype)
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key
        assert f.get_tensor("bf16").dtype == torch.bfloat16
    with safe_open(path, framework="np") as f:
        for key, want in flat.items():
            if want.dtype in (
                np.dtype(ml_dtypes.bfloat16),
                np.dtype(ml_dtypes.float8_e4m3fn),
                np.dtype(ml_dtypes.float8_e5m2),
            ):
                continue
            got = f.get_tensor(key)
            assert got.dtype == want.dtype, key
            np.testing.assert_array_equal(got, want)
    loaded = checkpointer.load(tmp_path / "c")
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16
    assert loaded["bf16"].tobytes() == state["bf16"].tobytes()
    assert loaded["step"] == 7 and loaded["name"] == "run"


def test_multi_file_checkpoint_round_trips(tmp_path: Path) -> None:
    arrays = {f"w{i}": np.full(10, i, np.float32) for i in range(8)}
    arrays["big"] = np.arange(100, dtype=np.float64)  # alone beyond the limit
    with checkpointer.CheckpointManager(tmp_path, max_file_bytes=64) as mgr:
        info = mgr.save(arrays, step=1)
    files = sorted(p.name for p in (tmp_path / info.name).glob("*.safetensors"))
    assert len(files) >= 5
    seen: set[str] = set()
    for name in files:
        with safe_open(str(tmp_path / info.name / name), framework="np") as f:
            seen |= set(f.keys())
    assert seen == set(arrays)
    got = checkpointer.load(tmp_path / info.name)
    assert list(got) == list(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)


# -- hostile data files ---------------------------------------------------------------




def _install(ckpt: Path, blob: bytes) -> None:
    """Replace the data file with ``blob`` and make the manifest's file entry agree."""
    (ckpt / DATA).write_bytes(blob)
    m = _manifest(ckpt)
    m["files"][0][1], m["files"][0][2] = len(blob), crc32c(blob)
    _put_manifest(ckpt, m)


def _st(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def _t(dtype: str, shape: list[int], offs: list[int]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offs}


_deep = b"[" * 100_000 + b"]" * 100_000
HOSTILE = [
    ("header-gigabytes", _st(b"{}", length=5 << 30), errors.HeaderTooLargeError),
    ("header-exabytes", _st(b"{}", length=2**63 + 5), errors.HeaderTooLargeError),
    ("header-beyond-file", _st(b"{}", length=1000), errors.TruncatedFileError),
    ("too-short", b"\x01\x02", errors.TruncatedFileError),
    (
        "overlap",
        _st({"w": _t("F32", [2], [0, 8]), "v": _t("F32", [2], [4, 12])}, b"\0" * 12),
        errors.InvalidOffsetsError,
    ),
    (
        "gap",
        _st({"w": _t("F32", [2], [0, 8]), "v": _t("F32", [2], [12, 20])}, b"\0" * 20),
        errors.InvalidOffsetsError,
    ),
    ("not-from-zero", _st({"w": _t("F32", [2], [4, 12])}, b"\0" * 12), errors.InvalidOffsetsError),
    (
        "shape-size-mismatch",
        _st({"w": _t("F32", [3], [0, 8])}, b"\0" * 8),
        errors.InvalidOffsetsError,
    ),
    ("reversed-offsets", _st({"w": _t("F32", [0], [8, 0])}, b"\0" * 8), errors.InvalidOffsetsError),
    (
        "negative-offsets",
        _st({"w": _t("F32", [2], [-8, 0])}, b"\0" * 8),
        errors.InvalidOffsetsError,
    ),
    (
        "float-offsets",
        _st({"w": _t("F32", [2], [0.0, 8.0])}, b"\0" * 8),
        errors.InvalidOffsetsError,
    ),
    (
        "huge-shape",
        _st({"w": _t("F32", [2**40], [0, 2**42])}, b"\0" * 8),
        errors.TruncatedFileError,
    ),
    (
        "unknown-dtype",
        _st({"w": _t("F128", [1], [0, 16])}, b"\0" * 16),
        errors.UnsupportedDtypeError,
    ),
    ("object-dtype", _st({"w": _t("O", [1], [0, 8])}, b"\0" * 8), errors.UnsupportedDtypeError),
    ("complex128", _st({"w": _t("C128", [1], [0, 16])}, b"\0" * 16), errors.UnsupportedDtypeError),
    (
        "duplicate-key",
        _st(
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            b"\0" * 8,
        ),
        errors.DuplicateKeyError,
    ),
    ("not-json", _st(b"this is not json", b""), errors.HeaderError),
    ("not-utf8", _st(b"\xff\xfe\xfd{}", b""), errors.HeaderError),
    ("json-list", _st(b"[1, 2]", b""), errors.HeaderError),
    ("json-deep", _st(_deep, b""), errors.HeaderError),
    (
        "json-huge-int",
        _st(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'),
        errors.HeaderError,
    ),
    ("json-huge-float", _st({"w": _t("F32", [1e300], [0, 4])}, b"\0" * 4), errors.HeaderError),
    ("entry-malformed", _st({"w": {"dtype": "F32"}}, b""), errors.HeaderError),
    (
        "entry-extra-field",
        _st({"w": {**_t("F32", [1], [0, 4]), "x": 1}}, b"\0" * 4),
        errors.HeaderError,
    ),
    ("negative-dim", _st({"w": _t("F32", [-1], [0, 4])}, b"\0" * 4), errors.HeaderError),
    ("data-beyond-end", _st({"w": _t("F32", [4], [0, 16])}, b"\0" * 8), errors.TruncatedFileError),
    ("trailing-bytes", _st({"w": _t("F32", [2], [0, 8])}, b"\0" * 12), errors.TrailingDataError),
]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize(("blob", "error"), [pytest.param(b, e, id=n) for n, b, e in HOSTILE])
def test_hostile_data_file(tmp_path: Path, blob: bytes, error: type, verify: bool) -> None:
    ckpt = _valid(tmp_path)
    _install(ckpt, blob)
    tracemalloc.start()
    try:
        with pytest.raises(error) as exc:
            checkpointer.load(ckpt, verify=verify)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if error is errors.HeaderError:
        assert type(exc.value) is errors.HeaderError
    assert DATA in str(exc.value)  # the message names the file
    assert peak < 64 << 20, f"{peak} bytes allocated for a {len(blob)}-byte file"


def test_file_disagreeing_with_manifest(tmp_path: Path) -> None:
    ckpt = _valid(tmp_path)
    _install(ckpt, _st({"w": _t("I32", [4], [0, 16])}, b"\0" * 16))
    with pytest.raises(errors.ManifestError):
        checkpointer.load(ckpt)
    _install(ckpt, _st({"v": _t("F32", [4], [0, 16])}, b"\0" * 16))
    with pytest.raises(errors.ManifestError):
        checkpointer.load(ckpt, verify=False)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda b: b[:-3], errors.TruncatedFileError),
        (lambda b: b + b"\0\0\0", errors.TrailingDataError),
        (lambda b: b"", errors.TruncatedFileError),
    ],
    ids=["truncated", "trailing", "empty"],
)
def test_data_file_length_changed(tmp_path: Path, change: Any, error: type, verify: bool) -> None:
    ckpt = _valid(tmp_path)
    (ckpt / DATA).write_bytes(change((ckpt / DATA).read_bytes()))
    with pytest.raises(error):
        checkpointer.load(ckpt, verify=verify)


def test_missing_data_file(tmp_path: Path) -> None:
    ckpt = _valid(tmp_path)
    (ckpt / DATA).unlink()
    with pytest.raises(errors.CorruptCheckpointError):
        checkpointer.load(ckpt)


def test_missing_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    ckpt = _valid(tmp_path)
    (ckpt / MANIFEST_NAME).unlink()
    with pytest.raises(errors.CheckpointNotFoundError):
        checkpointer.load(ckpt)
