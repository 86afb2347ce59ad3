"""The manifest schema: typed rows that round-trip to exactly the bytes of format version 1."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpointer import errors
from checkpointer.frame import decode_framed, encode_framed
from checkpointer.manifest import (
    MANIFEST_MAGIC,
    MANIFEST_NAME,
    FileRow,
    Manifest,
    PieceRow,
    ShardRow,
    TensorRow,
    check_tiling,
    parse,
    read_manifest,
)
from checkpointer.storage import open_store

FIXTURES = Path(__file__).parents[1] / "fixtures" / "v1"
OLD = [FIXTURES / "plain", FIXTURES / "managed" / "step-000000020",
       FIXTURES / "sharded" / "step-000000001", FIXTURES / "objects" / "step-000000005"]


@pytest.mark.parametrize("ckpt", OLD, ids=lambda p: p.parent.name + "/" + p.name)
def test_old_manifests_reencode_to_the_same_bytes(ckpt: Path) -> None:
    m = read_manifest(open_store(ckpt.parent), ckpt.name)
    assert m.encode() == (ckpt / MANIFEST_NAME).read_bytes()
    assert all(isinstance(t, TensorRow) for t in m.tensors) and m.files and isinstance(m.files[0], FileRow)


def test_sharded_manifest_has_typed_shard_and_block_rows() -> None:
    m = read_manifest(open_store(FIXTURES / "sharded"), "step-000000001")
    (shard,) = m.shards
    assert shard == ShardRow("emb", "F32", (2080, 1024), (PieceRow("emb@0.0", (0, 0)),
                                                            PieceRow("emb@1040.0", (1040, 0))))
    pieces = {t.key: t for t in m.tensors if "@" in t.key}
    assert m.block_bytes == 4 << 20 and all(len(t.blocks) == 2 for t in pieces.values())
    assert m.get("step") == 1 and m.get("managed") is True


_keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    shapes = draw(st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=1, max_size=6))
    keys = draw(st.lists(_keys, min_size=len(shapes), max_size=len(shapes), unique=True))
    tensors, at = [], 8
    for key, shape in zip(keys, shapes, strict=True):
        n = 4 * math.prod(shape)
        tensors.append(TensorRow(key, "data-00000.safetensors", "F32", tuple(shape), at, at + n,
                                 draw(st.integers(0, 2**32 - 1))))
        at += n
    fields = {"step": draw(st.none() | st.integers(0, 10**9)), "metrics": {"loss": 0.5}, "seq": 3}
    return Manifest(["d", []], (FileRow("data-00000.safetensors", at, 7),), tuple(tensors), (), None, fields)


@given(manifests())
def test_rows_round_trip(m: Manifest) -> None:
    again = parse(decode_framed(m.encode(), MANIFEST_MAGIC, "t"), "t")
    assert again == m


@pytest.mark.parametrize("edit, error", [
    (lambda b: b["tensors"][0].__setitem__(2, "F128"), errors.UnsupportedDtypeError),
    (lambda b: b["tensors"][0].__setitem__(3, [-1]), errors.ManifestError),
    (lambda b: b["tensors"][0].__setitem__(5, b["tensors"][0][5] + 4), errors.InvalidOffsetsError),
    (lambda b: b["tensors"].append(list(b["tensors"][0])), errors.DuplicateKeyError),
    (lambda b: b["files"][0].__setitem__(0, "../x"), errors.UnsafePathError),
    (lambda b: b["files"][0].__setitem__(1, "12"), errors.ManifestError),
    (lambda b: b.__setitem__("shards", [["emb", "F32", [2], [["nope", [0]]]]]), errors.ManifestError),
    (lambda b: b.__setitem__("blocks", {"w": [1]}), errors.ManifestError),
    (lambda b: b.__setitem__("version", 2), errors.ManifestError),
    # type confusion where a name is expected: a clear error, never a raw TypeError
    (lambda b: b["tensors"][0].__setitem__(1, ["data-00000.safetensors"]), errors.ManifestError),
    (lambda b: b["files"][0].__setitem__(0, ["x"]), errors.UnsafePathError),
    (lambda b: b["files"][0].__setitem__(0, "data-00000.safetensors\n"), errors.UnsafePathError),
    (lambda b: b.__setitem__("shards", [["e", "F32", [0], [[["k"], [0]]]]]), errors.ManifestError),
    (lambda b: b.__setitem__("shards", [["e", "F32", [1] * 100, []]]), errors.ManifestError),
])
def test_parse_refuses_each_broken_rule(edit, error) -> None:  # type: ignore[no-untyped-def]
    body = decode_framed((FIXTURES / "plain" / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    edit(body)
    with pytest.raises(error, match="where"):
        parse(body, "where")


def test_tiling_check_is_not_quadratic() -> None:
    """200,000 pieces of one array (a 1,000-rank job's embedding) validate in well under the
    bound; the first release took minutes (``list.index`` per piece per dimension)."""
    n = 200_000
    boxes = [((i * 3,), (3,)) for i in range(n)]
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    signal.alarm(20)  # a bound against a hang, not a performance assertion
    try:
        check_tiling((3 * n,), boxes, "w")
        with pytest.raises(errors.ManifestError, match="overlap or leave gaps"):
            check_tiling((3 * n,), [*boxes[:-1], ((3 * n - 4,), (3,))], "w")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("ts", [msgpack.Timestamp(1, 0), msgpack.Timestamp(2**33, 5), msgpack.Timestamp(-1, 0)])
def test_timestamp_extension_is_refused(ts: msgpack.Timestamp) -> None:
    body = decode_framed((FIXTURES / "plain" / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    body["metadata"] = ["d", [["when", ["s", "x"]], ["t", [ts]]]]
    blob = encode_framed(MANIFEST_MAGIC, body)  # msgpack decodes ext -1 itself, past ext_hook
    with pytest.raises(errors.ManifestError, match="timestamp"):
        parse(decode_framed(blob, MANIFEST_MAGIC, "t"), "t")


def test_timestamp_bytes_inside_a_value_are_not_a_timestamp() -> None:
    body = {"blob": b"\xd6\xff\xd7\xff\xc7\x0c\xff", "s": "\u00ff"}
    assert decode_framed(encode_framed(MANIFEST_MAGIC, body), MANIFEST_MAGIC, "t") == body
