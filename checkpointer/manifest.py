"""The manifest schema (format version 1): typed rows, built, validated and read here alone.

A manifest is a framed msgpack map (see :mod:`checkpointer.frame`)::

    {"format": "checkpointer", "version": 1, <fields: step, epoch, metrics, time, managed,
     seq, library, metadata>, ["shards": [ShardRow...]], ["block_bytes": int,
     "blocks": {piece key: [crc32c per block]}], "tree": <skeleton>, "files": [FileRow...],
     "tensors": [TensorRow...]}

On disk each row is a positional list (the bytes of version 1 never change); in memory it is
a NamedTuple, and no other module indexes rows by position. Everything read is untrusted:
:func:`parse` checks every field before anything else looks at it, so that readers can
rely on the rows (dtypes allow-listed, shapes bounded, byte ranges matching shape and dtype,
pieces tiling their array exactly). Whether a range lies inside its file is the read
engine's to check, against the file itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .dtypes import ITEMSIZE
from .errors import (
    CheckpointNotFoundError,
    DuplicateKeyError,
    InsufficientMemoryError,
    InvalidOffsetsError,
    ManifestError,
    StateTreeError,
    UnsafePathError,
    UnsupportedDtypeError,
)
from .frame import FRAME_BYTES, decode_framed, encode_framed, refuse_timestamps
from .storage import Store

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "MANIFEST_MAGIC", "MAX_MANIFEST_BYTES", "MAX_NDIM", "MAX_EXTENT",
           "FileRow", "TensorRow", "PieceRow", "ShardRow", "Piece", "Manifest", "parse",
           "read_manifest", "merge_pieces", "check_tiling", "check_file_name"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.msgpack"
MANIFEST_MAGIC = b"CKPTMAN1"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32  # what numpy can build
MAX_GRID_CELLS = 1 << 20
MAX_EXTENT = 1 << 62  # dimensions, offsets and byte sizes at or beyond it are hostile
_LIMIT = MAX_EXTENT
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")


class FileRow(NamedTuple):
    """One data file: its name, total length and checksum (see ``format.write_safetensors``)."""

    name: str
    nbytes: int
    crc32c: int

    def encode(self) -> list[Any]:
        return [self.name, self.nbytes, self.crc32c]

    @classmethod
    def decode(cls, row: list[Any]) -> FileRow:
        """A row of :meth:`encode` (from another rank of this job: trusted, not validated)."""
        name, nbytes, crc = row
        return cls(name, nbytes, crc)


class TensorRow(NamedTuple):
    """Where one tensor lives: file, key, dtype (safetensors name), shape, byte range, crc,
    and the crc32c of each block of ``block_bytes`` (pieces of sharded arrays only)."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    crc32c: int
    blocks: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def encode(self) -> list[Any]:
        return [self.key, self.file, self.dtype, list(self.shape), self.begin, self.end, self.crc32c]

    @classmethod
    def decode(cls, row: list[Any], blocks: Mapping[str, Sequence[int]]) -> TensorRow:
        """A row of :meth:`encode`, with its block checksums from ``blocks`` (piece key ->
        crc32c per block) when it has some (from another rank: trusted)."""
        key, file, dtype, shape, begin, end, crc = row
        return cls(key, file, dtype, tuple(shape), begin, end, crc, tuple(blocks.get(key, ())))


class PieceRow(NamedTuple):
    """One stored piece of a sharded array: its tensor key and where it starts."""

    key: str
    offsets: tuple[int, ...]


class ShardRow(NamedTuple):
    """A sharded array: its tree key, dtype, global shape and the pieces that tile it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[PieceRow, ...]

    def encode(self) -> list[Any]:
        return [self.key, self.dtype, list(self.shape), [[p.key, list(p.offsets)] for p in self.pieces]]


class Piece(NamedTuple):
    """A piece one rank writes, before the pieces of all ranks are merged into ShardRows."""

    array: str
    dtype: str
    shape: tuple[int, ...]
    key: str
    offsets: tuple[int, ...]
    piece_shape: tuple[int, ...]

    def encode(self) -> list[Any]:
        return [self.array, self.dtype, list(self.shape), self.key, list(self.offsets), list(self.piece_shape)]

    @classmethod
    def decode(cls, row: list[Any]) -> Piece:
        """A row of :meth:`encode` (from another rank: trusted)."""
        array, dtype, shape, key, offsets, piece_shape = row
        return cls(array, dtype, tuple(shape), key, tuple(offsets), tuple(piece_shape))


@dataclass(frozen=True)
class Manifest:
    """A checkpoint's manifest: the tree skeleton, the rows, and the writer's fields."""

    tree: Any
    files: tuple[FileRow, ...]
    tensors: tuple[TensorRow, ...]
    shards: tuple[ShardRow, ...] = ()
    block_bytes: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """One of the writer's fields (``step``, ``epoch``, ``metrics``, ``metadata``, ...)."""
        return self.fields.get(key, default)

    @property
    def nbytes(self) -> int:
        """Bytes of the data files."""
        return sum(f.nbytes for f in self.files)

    def by_file(self) -> dict[str, dict[str, TensorRow]]:
        """File name -> its tensors by key, files in manifest order."""
        out: dict[str, dict[str, TensorRow]] = {f.name: {} for f in self.files}
        for t in self.tensors:
            out[t.file][t.key] = t
        return out

    def encode(self) -> bytes:
        """The framed bytes (the same bytes as every writer of format version 1)."""
        extra: dict[str, Any] = {"shards": [s.encode() for s in self.shards]} if self.shards else {}
        blocks = {t.key: list(t.blocks) for t in self.tensors if t.blocks}
        if blocks:
            extra.update(block_bytes=self.block_bytes, blocks=blocks)
        body = {"format": "checkpointer", "version": FORMAT_VERSION, **self.fields, **extra,
                "tree": self.tree, "files": [f.encode() for f in self.files],
                "tensors": [t.encode() for t in self.tensors]}
        return encode_framed(MANIFEST_MAGIC, body)


def check_file_name(name: Any, where: str) -> str:
    """Refuse names that could escape a checkpoint folder."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise UnsafePathError(f"{where}: file name {name!r:.80} is not a plain file name")
    return name


def read_manifest(store: Store, name: str) -> Manifest:
    """Decode and validate ``name``'s manifest (not its data files).

    Raises:
        CheckpointNotFoundError: the folder has no manifest.
        CorruptCheckpointError: (a subclass of) the manifest breaks a rule; the message names it.
    """
    rel = f"{name}/{MANIFEST_NAME}"
    where = store.url_of(rel)
    try:
        size = store.size(rel)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{store.url_of(name)} is not a checkpoint (no manifest)") from None
    if size > MAX_MANIFEST_BYTES + FRAME_BYTES:
        raise ManifestError(f"{where}: {size} bytes, over the cap of {MAX_MANIFEST_BYTES}")
    try:
        data = store.read_bytes(rel)
    except MemoryError:
        raise InsufficientMemoryError(f"{where}: not enough memory to read its {size} bytes") from None
    return parse(decode_framed(data, MANIFEST_MAGIC, where, MAX_MANIFEST_BYTES), where)


_REQUIRED: dict[str, type] = {"format": str, "version": int, "tree": list, "files": list, "tensors": list}
_OWN_KEYS = frozenset(_REQUIRED) | {"shards", "block_bytes", "blocks"}


def parse(m: Any, where: str) -> Manifest:
    """A decoded manifest body as a :class:`Manifest`, every rule checked."""
    if not isinstance(m, dict) or any(type(m.get(k)) is not t for k, t in _REQUIRED.items()):
        raise ManifestError(f"{where}: required fields missing or of the wrong type")
    if m["format"] != "checkpointer" or m["version"] != FORMAT_VERSION:
        raise ManifestError(f"{where}: format {m['format']!r} version {m['version']!r} is not supported")
    files = _file_rows(m["files"], where)
    tensors = _tensor_rows(m["tensors"], {f.name: f.nbytes for f in files}, where)
    block_bytes = None
    if "blocks" in m or "block_bytes" in m:
        block_bytes, tensors = _with_blocks(m.get("block_bytes"), m.get("blocks"), tensors, where)
    shards = _shard_rows(m["shards"], tensors, where) if "shards" in m else ()
    fields = {k: v for k, v in m.items() if k not in _OWN_KEYS}
    refuse_timestamps(fields, where)  # the free-form part: the rows and the tree are typed
    return Manifest(m["tree"], files, tensors, shards, block_bytes, fields)


def _file_rows(rows: list[Any], where: str) -> tuple[FileRow, ...]:
    out: dict[str, FileRow] = {}
    for f in rows:
        if not (type(f) is list and len(f) == 3 and type(f[1]) is int and type(f[2]) is int):
            raise ManifestError(f"{where}: file entry {f!r:.80} is malformed")
        check_file_name(f[0], where)
        if f[0] in out or f[0] == MANIFEST_NAME:
            raise DuplicateKeyError(f"{where}: file {f[0]!r} listed twice")
        out[f[0]] = FileRow(f[0], f[1], f[2])
    return tuple(out.values())


def _ints(xs: Any, low: int = -_LIMIT) -> bool:
    """A list of ints in [low, 2**62)."""
    if type(xs) is not list:
        return False
    for x in xs:
        if type(x) is not int or not low <= x < _LIMIT:
            return False
    return True


def _tensor_rows(rows: list[Any], sizes: dict[str, int], where: str) -> tuple[TensorRow, ...]:
    out: dict[str, TensorRow] = {}
    itemsize = ITEMSIZE  # no dtype built: ml_dtypes is imported only for its dtypes' data
    make = TensorRow.__new__  # a hot loop: thousands of rows per manifest
    for t in rows:
        if not (type(t) is list and len(t) == 7 and type(t[0]) is str and type(t[1]) is str and t[1] in sizes
                and type(t[2]) is str and _ints(t[3], 0) and type(t[4]) is int
                and type(t[5]) is int and type(t[6]) is int):
            raise ManifestError(f"{where}: tensor entry {t!r:.80} is malformed")
        key, file, code, shape, begin, end, crc = t
        if key in out:
            raise DuplicateKeyError(f"{where}: tensor {key!r:.80} listed twice")
        size = itemsize.get(code)
        if size is None:
            raise UnsupportedDtypeError(f"{where}: tensor {key!r:.80} has dtype {code!r:.20}")
        nbytes = math.prod(shape) * size
        if len(shape) > MAX_NDIM or (not nbytes and math.prod(d for d in shape if d) * size >= _LIMIT):
            raise ManifestError(f"{where}: tensor {key!r:.80} has an invalid shape")
        if not 8 <= begin <= end or nbytes != end - begin:
            raise InvalidOffsetsError(f"{where}: tensor {key!r:.80} has an invalid byte range")
        out[key] = make(TensorRow, key, file, code, tuple(shape), begin, end, crc, ())
    return tuple(out.values())


def _with_blocks(size: Any, blocks: Any, tensors: tuple[TensorRow, ...], where: str
                 ) -> tuple[int, tuple[TensorRow, ...]]:
    """``block_bytes`` and ``blocks`` (piece key -> crc32c of each block) must agree with
    the tensors they describe; the blocks are attached to their tensor rows."""
    if type(size) is not int or not 4096 <= size <= 1 << 30 or size % 64 or not isinstance(blocks, dict):
        raise ManifestError(f"{where}: 'block_bytes' / 'blocks' are malformed")
    lengths = {t.key: t.nbytes for t in tensors}
    for key, crcs in blocks.items():
        n = lengths.get(key)
        if n is None or not _ints(crcs, 0) or len(crcs) != -(-n // size) or any(c >= 1 << 32 for c in crcs):
            raise ManifestError(f"{where}: block checksums of {key!r:.80} are malformed")
    return size, tuple(t._replace(blocks=tuple(blocks[t.key])) if t.key in blocks else t for t in tensors)


def _shard_rows(shards: Any, tensors: tuple[TensorRow, ...], where: str) -> tuple[ShardRow, ...]:
    """Well formed, pieces stored with their array's dtype, tiling each array exactly."""
    if not isinstance(shards, list):
        raise ManifestError(f"{where}: 'shards' is not a list")
    by_key = {t.key: t for t in tensors}
    out: dict[str, ShardRow] = {}
    for entry in shards:
        if not (type(entry) is list and len(entry) == 4 and type(entry[0]) is str
                and type(entry[1]) is str and entry[1] in ITEMSIZE and _ints(entry[2], 0)
                and len(entry[2]) <= MAX_NDIM and type(entry[3]) is list):
            raise ManifestError(f"{where}: shard entry {entry!r:.80} is malformed")
        key, code, shape, pieces = entry
        if key in out:
            raise ManifestError(f"{where}: sharded array {key!r:.80} listed twice")
        rows = []
        for p in pieces:
            if not (type(p) is list and len(p) == 2 and type(p[0]) is str and p[0] in by_key and _ints(p[1])):
                raise ManifestError(f"{where}: piece {p!r:.80} of {key!r:.80} is malformed")
            if by_key[p[0]].dtype != code:
                raise ManifestError(f"{where}: piece {p[0]!r:.80} has dtype {by_key[p[0]].dtype}, its array {code}")
            rows.append(PieceRow(p[0], tuple(p[1])))
        check_tiling(shape, [(r.offsets, by_key[r.key].shape) for r in rows], f"{where}: sharded array {key!r:.80}")
        out[key] = ShardRow(key, code, tuple(shape), tuple(rows))
    return tuple(out.values())


def check_tiling(shape: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]],
                 where: str) -> None:
    """Refuse pieces that do not tile ``shape`` exactly (gaps, overlaps, out of bounds).

    Works on the grid of piece boundaries, so the cost is bounded by ``MAX_GRID_CELLS``
    whatever a hostile manifest claims.
    """
    shape = tuple(shape)
    for offs, piece in boxes:
        if len(offs) != len(shape) or len(piece) != len(shape) or any(
                o < 0 or n < 0 or o + n > g for o, n, g in zip(offs, piece, shape, strict=True)):
            raise ManifestError(f"{where}: piece {tuple(offs)}+{tuple(piece)} is outside {shape}")
    if math.prod(shape) == 0:
        return
    if sum(math.prod(p) for _, p in boxes) != math.prod(shape):
        raise ManifestError(f"{where}: pieces hold {sum(math.prod(p) for _, p in boxes)} elements, "
                            f"the array {math.prod(shape)}")
    cuts = [sorted({0, g} | {o[d] for o, _ in boxes} | {o[d] + p[d] for o, p in boxes})
            for d, g in enumerate(shape)]
    if math.prod(len(c) - 1 for c in cuts) > MAX_GRID_CELLS:
        raise ManifestError(f"{where}: too many distinct piece boundaries")
    at = [{v: i for i, v in enumerate(c)} for c in cuts]  # boundary -> grid index, O(1) each
    cover = np.zeros([len(c) - 1 for c in cuts], dtype=np.int64)
    for offs, piece in boxes:
        if math.prod(piece) == 0:
            continue
        idx = tuple(slice(a[o], a[o + n]) for a, o, n in zip(at, offs, piece, strict=True))
        cover[idx] += 1
    if not (cover == 1).all():
        raise ManifestError(f"{where}: pieces overlap or leave gaps")


def merge_pieces(pieces: Iterable[Piece], where: str) -> tuple[ShardRow, ...]:
    """Group every rank's pieces into the manifest's shard rows, checking that the pieces of
    each array tile it exactly (a missing rank shows up here)."""
    merged: dict[str, ShardRow] = {}
    boxes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    for p in pieces:
        row = merged.setdefault(p.array, ShardRow(p.array, p.dtype, p.shape, ()))
        if row.dtype != p.dtype or row.shape != p.shape:
            raise StateTreeError(f"sharded array {p.array!r}: ranks disagree on dtype or shape")
        merged[p.array] = row._replace(pieces=(*row.pieces, PieceRow(p.key, p.offsets)))
        boxes.setdefault(p.array, []).append((p.offsets, p.piece_shape))
    for key, bs in boxes.items():
        try:
            check_tiling(merged[key].shape, bs, where)
        except ManifestError as exc:
            raise StateTreeError(f"sharded array {key!r}: the pieces of all ranks do not cover it "
                                 f"exactly ({exc})") from None
    return tuple(merged.values())
