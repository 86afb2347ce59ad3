"""Hostile manifests, bit flips in every file, and special files: each refused with the
specific error from :mod:`checkpointer.errors`, never a crash, a hang or a huge allocation."""

from __future__ import annotations

import os
import struct
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from _ckpt_files import _manifest, _put_manifest, _valid

import checkpointer
from checkpointer import errors
from checkpointer.checksum import crc32c
from checkpointer.frame import encode_framed
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME

DATA = "data-00000.safetensors"




# -- hostile manifests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/etc/passwd",
        "a/b",
        "..",
        "",
        "a\\b",
        ".hidden",
        "../../../../etc/passwd",
        "x" * 300,
        "a\x00b",
    ],
)
def test_manifest_unsafe_file_name(tmp_path: Path, name: str) -> None:
    ckpt = _valid(tmp_path)
    m = _manifest(ckpt)
    m["files"][0][0] = name
    for t in m["tensors"]:
        t[1] = name
    _put_manifest(ckpt, m)
    for verify in (True, False):
        with pytest.raises(errors.UnsafePathError):
            checkpointer.load(ckpt, verify=verify)


def _framed_raw(
    body: bytes, length: int | None = None, crc: int | None = None, magic: bytes = MANIFEST_MAGIC
) -> bytes:
    return (
        struct.pack(
            "<8sIQ",
            magic,
            crc32c(body) if crc is None else crc,
            len(body) if length is None else length,
        )
        + body
    )


def _with(key: str, value: Any) -> Any:
    def patch(m: dict[str, Any]) -> bytes:
        m[key] = value
        return encode_framed(MANIFEST_MAGIC, m)

    return patch


def _dup_tensor(m: dict[str, Any]) -> bytes:
    m["tensors"].append(list(m["tensors"][0]))
    return encode_framed(MANIFEST_MAGIC, m)


def _dup_file(m: dict[str, Any]) -> bytes:
    m["files"].append(list(m["files"][0]))
    return encode_framed(MANIFEST_MAGIC, m)


MANIFESTS = [
    ("ext-type", _with("metadata", msgpack.ExtType(5, b"x")), errors.ManifestError),
    ("ext-in-tree", _with("tree", ["d", [["k", msgpack.ExtType(1, b"")]]]), errors.ManifestError),
    # a complete manifest, so that only the timestamp (ext -1, decoded by msgpack itself) is wrong
    ("timestamp-ext", _with("metadata", msgpack.Timestamp(1, 0)), errors.ManifestError),
    ("timestamp-ext-in-metrics", _with("metrics", {"t": msgpack.Timestamp(2**40, 1)}), errors.ManifestError),
    ("huge-body", lambda m: _framed_raw(b"\x80", length=2**40), errors.ManifestError),
    ("huge-array-claim", lambda m: _framed_raw(b"\xdd\xff\xff\xff\xff"), errors.ManifestError),
    ("huge-map-claim", lambda m: _framed_raw(b"\xdf\xff\xff\xff\xff"), errors.ManifestError),
    ("huge-bin-claim", lambda m: _framed_raw(b"\xc6\xff\xff\xff\xff"), errors.ManifestError),
    ("deep-nesting", lambda m: _framed_raw(b"\x91" * 100_000 + b"\xc0"), errors.ManifestError),
    ("big-int-leaf", _with("tree", ["I", "9" * 5000]), errors.ManifestError),
    ("int-map-key", lambda m: encode_framed(MANIFEST_MAGIC, {1: 2}), errors.ManifestError),
    ("not-a-map", lambda m: encode_framed(MANIFEST_MAGIC, [1, 2]), errors.ManifestError),
    ("bad-magic", lambda m: _framed_raw(msgpack.packb(m), magic=b"PICKLE!!"), errors.ManifestError),
    ("too-short", lambda m: b"CKPT", errors.ManifestError),
    ("bad-crc", lambda m: _framed_raw(msgpack.packb(m), crc=1), errors.ChecksumMismatchError),
    ("body-truncated", lambda m: _framed_raw(msgpack.packb(m))[:-2], errors.TruncatedFileError),
    ("body-trailing", lambda m: _framed_raw(msgpack.packb(m)) + b"\0", errors.TrailingDataError),
    ("future-version", _with("version", 99), errors.ManifestError),
    ("wrong-format", _with("format", "pickle"), errors.ManifestError),
    ("files-missing", _with("files", None), errors.ManifestError),
    ("file-entry-bad", _with("files", [["data-00000.safetensors", "1", 2]]), errors.ManifestError),
    ("tensor-entry-bad", _with("tensors", [["w"]]), errors.ManifestError),
    (
        "tensor-unknown-file",
        lambda m: _with(
            "tensors", [[*m["tensors"][0][:1], "nope.safetensors", *m["tensors"][0][2:]]]
        )(m),
        errors.ManifestError,
    ),
    ("duplicate-tensor", _dup_tensor, errors.DuplicateKeyError),
    ("duplicate-file", _dup_file, errors.DuplicateKeyError),
    ("tree-missing-array", _with("tree", ["a", "nope"]), errors.ManifestError),
    ("tree-bad-node", _with("tree", ["zz", 1]), errors.ManifestError),
]


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize(("patch", "error"), [pytest.param(p, e, id=n) for n, p, e in MANIFESTS])
def test_hostile_manifest(tmp_path: Path, patch: Any, error: type, verify: bool) -> None:
    ckpt = _valid(tmp_path)
    (ckpt / MANIFEST_NAME).write_bytes(patch(_manifest(ckpt)))
    tracemalloc.start()
    try:
        with pytest.raises(error) as exc:
            checkpointer.load(ckpt, verify=verify)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert MANIFEST_NAME in str(exc.value)  # the message names the file
    assert peak < 64 << 20


def test_oversized_manifest_file_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _valid(tmp_path)
    monkeypatch.setattr("checkpointer.manifest.MAX_MANIFEST_BYTES", 16)
    with pytest.raises(errors.ManifestError):
        checkpointer.load(ckpt)


# -- bit flips: every byte of every file ----------------------------------------------------


def _flip_each(path: Path, ckpt: Path, masks: tuple[int, ...]) -> list[tuple[int, str]]:
    """Flip each byte of ``path`` in turn (each mask); return (position, error class name)."""
    original = path.read_bytes()
    seen = []
    try:
        for pos in range(len(original)):
            for mask in masks:
                damaged = bytearray(original)
                damaged[pos] ^= mask
                path.write_bytes(bytes(damaged))
                with pytest.raises(errors.CorruptCheckpointError) as exc:
                    checkpointer.load(ckpt)
                seen.append((pos, type(exc.value).__name__))
                try:  # without verification: refused or loaded, never a crash
                    checkpointer.load(ckpt, verify=False)
                except errors.CorruptCheckpointError:
                    pass
    finally:
        path.write_bytes(original)
    return seen


@pytest.mark.parametrize("which", ["data", "manifest"])
def test_every_flipped_byte_is_detected(tmp_path: Path, which: str) -> None:
    ckpt = tmp_path / "c"
    checkpointer.save(
        ckpt, {"w": np.arange(3, dtype=np.float32), "b": np.array([1], np.uint8), "t": (1, "x")}
    )
    path = ckpt / (DATA if which == "data" else MANIFEST_NAME)
    seen = _flip_each(path, ckpt, (0x01, 0x80) if which == "data" else (0x01,))
    assert seen
    if which == "data":  # the last bytes are tensor data: a checksum catches them
        assert seen[-1][1] == "ChecksumMismatchError"
    checkpointer.load(ckpt)  # restored file loads again


def test_tensor_byte_flip_is_checksum_error_and_loads_unverified(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    checkpointer.save(ckpt, {"w": np.zeros(4, np.float32)})
    raw = bytearray((ckpt / DATA).read_bytes())
    raw[-1] ^= 0x40
    (ckpt / DATA).write_bytes(bytes(raw))
    with pytest.raises(errors.ChecksumMismatchError) as exc:
        checkpointer.load(ckpt)
    assert "'w'" in str(exc.value) or DATA in str(exc.value)
    assert checkpointer.load(ckpt, verify=False)["w"].tobytes() != np.zeros(4, np.float32).tobytes()


def _within(seconds: float, fn: Any) -> Any:
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds}s"
    return out


@pytest.mark.parametrize("kind", ["manifest-fifo", "manifest-dev-zero", "data-fifo"])
def test_special_files_are_refused_without_hanging(tmp_path: Path, kind: str) -> None:
    ckpt = _valid(tmp_path)
    if kind == "data-fifo":
        m = _manifest(ckpt)
        m["files"][0][1] = 0  # a hostile manifest agreeing with the FIFO's size
        _put_manifest(ckpt, m)
        (ckpt / DATA).unlink()
        os.mkfifo(ckpt / DATA)
    else:
        (ckpt / MANIFEST_NAME).unlink()
        if kind == "manifest-fifo":
            os.mkfifo(ckpt / MANIFEST_NAME)
        else:
            os.symlink("/dev/zero", ckpt / MANIFEST_NAME)
    out = _within(10, lambda: checkpointer.load(ckpt))
    assert isinstance(out.get("error"), errors.CorruptCheckpointError), out
    out = _within(10, lambda: checkpointer.CheckpointManager(tmp_path).checkpoints)
    assert "error" not in out, out
