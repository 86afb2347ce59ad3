"""Hostile files, crafted: what an attacker would write, checksums and all.

Sizes at the caps, huge shapes, deep nesting, duplicate keys, overlapping offsets, msgpack
ext types, path escapes, unknown tree tags: each ends in a ``CheckpointError`` within a few
MB of allocation, and the CLI reports it without a traceback. A list where a name is
expected or a 100-dimension shard shape is refused by every entry point, and a manager
still opens the directory. A full load also runs with pickle and ``numpy.load`` booby-trapped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import struct
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from _hostile import (
    GOOD,
    bounded_memory,
    frame,
    framed_header,
    get_at,
    layered_state,
    only_checkpoint_errors,
    parse_header,
    replaced,
)

import checkpointer
from checkpointer import CheckpointWarning, errors, reading
from checkpointer import format as fmt
from checkpointer.checksum import crc32c
from checkpointer.cli import main
from checkpointer.frame import decode_framed
from checkpointer.index import INDEX_NAME
from checkpointer.load import load_checkpoint
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME
from checkpointer.storage import open_store


def crafted_store(
    header: dict[str, Any], data: bytes, tree: Any, tensors: list[list[Any]] | None = None,
    **fields: Any,
) -> tuple[Any, str]:
    """A checkpoint an attacker wrote: consistent checksums, hostile content."""
    blob = json.dumps(header).encode()
    body = struct.pack("<Q", len(blob)) + blob + data
    base = 8 + len(blob)
    if tensors is None:
        tensors = [
            [
                k,
                "data-00000.safetensors",
                v["dtype"],
                v["shape"],
                base + v["data_offsets"][0],
                base + v["data_offsets"][1],
                crc32c(data[v["data_offsets"][0] : v["data_offsets"][1]]),
            ]
            for k, v in header.items()
            if k != "__metadata__"
        ]
    try:  # the file checksum exactly as the engine computes it, where the engine can
        entries, head = fmt.read_header(io.BytesIO(body), len(body), "crafted")
        f = io.BytesIO(body)
        file_crc = reading.read_tensors(f, entries, {t[0]: t[6] for t in tensors}, "crafted", head)[1]
    except Exception:  # noqa: BLE001 - the load fails before comparing it anyway
        file_crc = 0
    manifest = {
        **GOOD,
        "tree": tree,
        "tensors": tensors,
        "files": [["data-00000.safetensors", len(body), file_crc]],
        **fields,
    }
    store = open_store(f"memory://crafted-{uuid.uuid4().hex[:8]}")
    store.put_bytes("c/data-00000.safetensors", body)
    store.put_bytes(f"c/{MANIFEST_NAME}", frame(msgpack.packb(manifest, use_bin_type=True)))
    return store, "c"


def _nested(depth: int) -> Any:
    node: Any = ["n"]
    for _ in range(depth):
        node = ["l", [node]]
    return node


ONE = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
CRAFTED_HEADERS = {
    "length prefix 2**64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "length at the cap, tiny file": struct.pack("<Q", fmt.MAX_HEADER_BYTES) + b"{}",
    "nesting 100k deep": framed_header(None, b"", None)[:0]
    + struct.pack("<Q", 200000)
    + b"[" * 100000
    + b"]" * 100000,
    "object dtype": framed_header(
        {"x": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None
    ),
    "duplicate key": struct.pack("<Q", 2 * len(json.dumps(ONE)) - 1)
    + (json.dumps(ONE)[:-1] + "," + json.dumps(ONE)[1:]).encode()
    + b"\0" * 8,
    "overlap": framed_header(
        {
            "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
        },
        b"\0" * 6,
        None,
    ),
    "gap": framed_header(
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None
    ),
    "huge shape, tiny data": framed_header(
        {"x": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 4]}}, b"\0" * 4, None
    ),
    "offsets past the end": framed_header(
        {"x": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}}, b"\0" * 4, None
    ),
    "shape 65 dims": framed_header(
        {"x": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}, b"\0", None
    ),
    "not utf-8": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "an int of 5000 digits": struct.pack("<Q", 5010) + b'{"x": ' + b"1" * 5000 + b"}   ",
}


@pytest.mark.parametrize("name", list(CRAFTED_HEADERS))
def test_crafted_headers(name: str) -> None:
    data = CRAFTED_HEADERS[name]
    with bounded_memory() as run:
        assert run(lambda: parse_header(data)) != "ok"


CRAFTED_MANIFESTS = {
    "msgpack ext type": frame(msgpack.packb(msgpack.ExtType(5, b"boom"))),
    "depth bomb": frame(b"\x91" * 100000 + b"\xc0"),
    "array of 2**32-1 items": frame(b"\xdd\xff\xff\xff\xff"),
    "str of 2**32-1 bytes": frame(b"\xdb\xff\xff\xff\xff"),
    "length over the cap": struct.pack("<8sIQ", MANIFEST_MAGIC, 0, 2**40),
    "wrong magic": frame(b"\xc0", b"PICKLE!!"),
}


@pytest.mark.parametrize("name", list(CRAFTED_MANIFESTS))
def test_crafted_manifest_frames(name: str) -> None:
    with bounded_memory() as run:
        assert (
            run(
                lambda: only_checkpoint_errors(
                    lambda: decode_framed(CRAFTED_MANIFESTS[name], MANIFEST_MAGIC, "crafted")
                )
            )
            != "ok"
        )


def _checkpoint_cases() -> dict[str, tuple[Any, ...]]:
    x = np.arange(3, dtype=np.float32).tobytes()
    hx = {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    return {
        "path escape in file name": (
            hx,
            x,
            ["a", "x"],
            [["x", "../../etc/passwd", "F32", [3], 0, 0, 0]],
        ),
        "tree names a missing array": (hx, x, ["a", "nope"], None),
        "tree 400 levels deep": (hx, x, _nested(400), None),
        "unknown tree tag": (hx, x, ["pickle", "os.system"], None),
        "zero-size array with a huge shape": (
            {"x": {"dtype": "F32", "shape": [0, 2**61, 2**61], "data_offsets": [0, 0]}},
            b"",
            ["a", "x"],
            None,
        ),
        "big-int leaf of 4350 digits": (hx, x, ["I", "9" * 4350], None),
        "big-int leaf '--5'": (hx, x, ["I", "--5"], None),
        "manifest disagrees with the header": (
            hx,
            x,
            ["a", "x"],
            [["x", "data-00000.safetensors", "F32", [2], 0, 0, 0]],
        ),
    }




@pytest.mark.parametrize("name", list(_checkpoint_cases()))
def test_crafted_checkpoints(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    store, ckpt = crafted_store(*_checkpoint_cases()[name])
    with bounded_memory() as run:
        assert run(lambda: only_checkpoint_errors(lambda: load_checkpoint(store, ckpt))) != "ok"
    # the CLI shows (inspect) or refuses it, and verify fails it: a message, never a traceback
    assert main(["inspect", store.url_of(ckpt)]) in (0, 2)
    assert main(["verify", store.url_of(ckpt)]) == 1
    assert "Traceback" not in "".join(capsys.readouterr())


def test_load_path_never_unpickles(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full load (plain and through a manager) with pickle and numpy.load booby-trapped."""
    import pickle

    state = {
        "w": np.arange(10, dtype=np.float32),
        "meta": {"s": "x", "b": b"y", "t": (1, 2.5, None)},
        "g": np.float16(3),
    }
    with checkpointer.CheckpointManager(tmp_path / "m", monitor="loss") as mgr:
        mgr.save(state, step=1, metrics={"loss": 1.0})

    def trap(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the load path called pickle / numpy.load")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (np, "load")):
        monkeypatch.setattr(mod, name, trap)
    got = checkpointer.load(tmp_path / "m" / "step-000000001")
    assert got["meta"] == state["meta"] and (got["w"] == state["w"]).all()
    with checkpointer.CheckpointManager(tmp_path / "m", monitor="loss") as mgr:
        assert mgr.restore("best").state["g"] == np.float16(3)


# A checksum-valid manifest with a list where a name is expected, or a 100-dimension shard
# shape, used to be a raw TypeError / ValueError from load, CheckpointManager() and the CLI.
CONFUSED = {
    "a list as a file name": (("files", 0, 0), lambda v: [v], errors.UnsafePathError),
    "a list as a tensor's file": (("tensors", 0, 1), lambda v: [v], errors.ManifestError),
    "a list as a piece key": (("shards", 0, 3, 0, 0), lambda v: [v], errors.ManifestError),
    "a 100-dimension shard shape": (("shards", 0, 2), lambda v: [1] * 100, errors.ManifestError),
}


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "not-indexed"])
@pytest.mark.parametrize("case", list(CONFUSED))
def test_a_confused_manifest_is_refused_everywhere_and_skipped_by_a_manager(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
        case: str, indexed: bool) -> None:
    with checkpointer.CheckpointManager(tmp_path) as mgr:
        good = mgr.save(layered_state(1, 0), step=1).name
        bad = mgr.save(layered_state(1, 1), step=2).name
    path, make, error = CONFUSED[case]
    body = decode_framed((tmp_path / bad / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    (tmp_path / bad / MANIFEST_NAME).write_bytes(frame(msgpack.packb(
        replaced(body, path, make(get_at(body, path))), use_bin_type=True)))
    if not indexed:
        (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(error):
        checkpointer.load(tmp_path / bad)
    with pytest.raises(error):
        checkpointer.open(tmp_path / bad)
    with caplog.at_level(logging.WARNING, logger="checkpointer"), pytest.warns(CheckpointWarning) \
            if indexed else contextlib.nullcontext():
        mgr = checkpointer.CheckpointManager(tmp_path)
        # listed (the index knows it) or skipped, a warning naming it either way
        assert [c.name for c in mgr.checkpoints] == ([good, bad] if indexed else [good])
        assert any(bad in r.getMessage() for r in caplog.records)
        assert mgr.restore().info.name == good  # falling back past it (with a warning) when listed
    assert main(["ls", str(tmp_path)]) in (0, 1)  # 1: it lists a broken checkpoint
    out = capsys.readouterr()
    assert good in out.out and "Traceback" not in out.out + out.err
    for argv, rc in ((["inspect", str(tmp_path / bad)], 2), (["verify", str(tmp_path / bad)], 1),
                     (["verify", str(tmp_path)], 1)):
        assert main(argv) == rc, argv
        out = capsys.readouterr()
        assert "Traceback" not in out.out + out.err and bad in out.out + out.err




@pytest.mark.parametrize("sharded", [False, True], ids=["tensor", "shard"])
def test_sixty_four_dimensions_load_or_are_refused(sharded: bool) -> None:
    """64 dimensions (numpy 2's limit): a value or a CheckpointError from every entry point,
    and a manager opens on the directory."""
    ndim = 64
    key = "s@" + ".".join(["0"] * ndim) if sharded else "x"
    header = {key: {"dtype": "F32", "shape": [1] * ndim, "data_offsets": [0, 4]}}
    extra = {"shards": [["s", "F32", [1] * ndim, [[key, [0] * ndim]]]]} if sharded else {}
    store, ckpt = crafted_store(header, np.float32(1.5).tobytes(), ["a", "s" if sharded else "x"], **extra)
    if only_checkpoint_errors(lambda: load_checkpoint(store, ckpt)) == "ok":
        got = load_checkpoint(store, ckpt)[0]
        assert got.shape == (1,) * ndim and got.item() == 1.5

    def read() -> None:
        with checkpointer.open(store.url_of(ckpt)) as reader:
            assert reader.tensor(key).shape == (1,) * ndim

    only_checkpoint_errors(read)
    mgr = checkpointer.CheckpointManager(store.url)  # opens, whatever the folder holds
    assert [c.name for c in mgr.checkpoints] in ([ckpt], [])
