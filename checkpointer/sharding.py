"""Sharded arrays, framework-free: a global shape and dtype, and the pieces one process holds.

Adapters turn a PyTorch ``DTensor`` / FSDP2 parameter or a JAX ``jax.Array`` spread over
processes into a :class:`ShardedArray` (the pieces this process writes: replicas are
written once) and describe what a process wants back with a :class:`ShardSpec`. A
checkpoint stores each piece as its own safetensors tensor (``<key>@<o0>.<o1>...``) and
the manifest records how the pieces tile the global array; a loader reassembles the
full array, or reads only the pieces a :class:`ShardSpec` overlaps (resharding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ManifestError, StateTreeError

__all__ = ["Shard", "ShardedArray", "ShardSpec", "piece_key", "check_tiling", "assemble", "cut"]

MAX_GRID_CELLS = 1 << 20


@dataclass(frozen=True)
class Shard:
    """One piece: where it starts in the global array, and its values."""

    offsets: tuple[int, ...]
    data: np.ndarray


def _check_box(shape: tuple[int, ...], offsets: Sequence[int], piece: Sequence[int], what: str) -> None:
    if len(offsets) != len(shape) or len(piece) != len(shape):
        raise StateTreeError(f"{what}: rank differs from the global shape {shape}")
    for o, n, g in zip(offsets, piece, shape, strict=True):
        if o < 0 or n < 0 or o + n > g:
            raise StateTreeError(f"{what}: piece at {tuple(offsets)} of shape {tuple(piece)} "
                                 f"does not fit in {shape}")


@dataclass(frozen=True)
class ShardedArray:
    """A global array of which this process writes ``shards``.

    Example::

        ShardedArray((8, 4), np.dtype("float32"), (Shard((4, 0), local_rows),))
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    shards: tuple[Shard, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        for s in self.shards:
            if s.data.dtype != self.dtype:
                raise StateTreeError(f"shard dtype {s.data.dtype} differs from {self.dtype}")
            _check_box(self.shape, s.offsets, s.data.shape, "shard")


@dataclass(frozen=True)
class ShardSpec:
    """What one process wants back on restore: boxes ``(offsets, shape)`` of the global array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    boxes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


def piece_key(key: str, offsets: Sequence[int]) -> str:
    """The safetensors key of the piece of ``key`` starting at ``offsets``."""
    return f"{key}@{'.'.join(str(int(o)) for o in offsets)}"


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
    cover = np.zeros([len(c) - 1 for c in cuts], dtype=np.int64)
    for offs, piece in boxes:
        if math.prod(piece) == 0:
            continue
        idx = tuple(slice(c.index(o), c.index(o + n)) for c, o, n in zip(cuts, offs, piece, strict=True))
        cover[idx] += 1
    if not (cover == 1).all():
        raise ManifestError(f"{where}: pieces overlap or leave gaps")


def assemble(shape: tuple[int, ...], dtype: np.dtype, pieces: Sequence[tuple[Sequence[int], np.ndarray]]) -> np.ndarray:
    """The full array from pieces already checked by :func:`check_tiling`."""
    out = np.empty(shape, dtype=dtype)
    for offs, data in pieces:
        out[tuple(slice(o, o + n) for o, n in zip(offs, data.shape, strict=True))] = data
    return out


def cut(box: tuple[Sequence[int], Sequence[int]], pieces: Sequence[tuple[Sequence[int], Any]],
        read: Any, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (the array of ``box``) from the stored ``pieces`` it overlaps;
    ``read(piece)`` gives one piece's values."""
    offs, shape = box
    for p_offs, p in pieces:
        p_shape = p[1]
        lo = [max(a, b) for a, b in zip(offs, p_offs, strict=True)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offs, shape, p_offs, p_shape, strict=True)]
        if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
            continue  # no overlap (an empty box needs nothing)
        data = read(p)
        src = tuple(slice(a - b, c - b) for a, b, c in zip(lo, p_offs, hi, strict=True))
        dst = tuple(slice(a - b, c - b) for a, b, c in zip(lo, offs, hi, strict=True))
        out[dst] = data[src]
    return out


def split_pieces(arrays: Sequence[tuple[str, Any]], *, primary: bool
                 ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]], list[list[Any]]]:
    """Split flattened leaves into what this rank writes: plain arrays (the primary rank
    only: they are replicated), its pieces, and the rows describing those pieces."""
    from .dtypes import numpy_to_safetensors

    plain, pieces, meta = [], [], []
    for key, value in arrays:
        if isinstance(value, ShardedArray):
            code = numpy_to_safetensors(value.dtype)
            if code is None:
                raise StateTreeError(f"sharded array {key!r}: dtype {value.dtype} is not supported")
            for s in value.shards:
                pk = piece_key(key, s.offsets)
                pieces.append((pk, s.data))
                meta.append([key, code, list(value.shape), pk, [int(o) for o in s.offsets],
                             list(s.data.shape)])
        elif primary:
            plain.append((key, value))
    return plain, pieces, meta


def merge_shards(rows: Sequence[list[Any]], where: str) -> list[list[Any]]:
    """Group every rank's piece rows into the manifest's ``shards`` entries, checking that
    the pieces of each array tile it exactly (a missing rank shows up here)."""
    merged: dict[str, list[Any]] = {}
    boxes: dict[str, list[tuple[list[int], list[int]]]] = {}
    for key, code, shape, pk, offs, piece_shape in rows:
        entry = merged.setdefault(key, [key, code, shape, []])
        if entry[1] != code or entry[2] != shape:
            raise StateTreeError(f"sharded array {key!r}: ranks disagree on dtype or shape")
        entry[3].append([pk, offs])
        boxes.setdefault(key, []).append((offs, piece_shape))
    for key, bs in boxes.items():
        try:
            check_tiling(merged[key][2], bs, where)
        except ManifestError as exc:
            raise StateTreeError(f"sharded array {key!r}: the pieces of all ranks do not cover it "
                                 f"exactly ({exc})") from None
    return list(merged.values())


def validate_shards(m: dict[str, Any], where: str) -> None:
    """Check the manifest's ``shards``: well formed, pieces stored with the right dtype,
    and tiling each global array exactly."""
    tensors = {t[0]: t for t in m["tensors"]}
    shards = m["shards"]
    if not isinstance(shards, list):
        raise ManifestError(f"{where}: 'shards' is not a list")
    seen = set()
    for entry in shards:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list)
                and all(type(d) is int and d >= 0 for d in entry[2]) and isinstance(entry[3], list)):
            raise ManifestError(f"{where}: shard entry {entry!r:.80} is malformed")
        key, code, shape, pieces = entry
        if key in seen:
            raise ManifestError(f"{where}: sharded array {key!r:.80} listed twice")
        seen.add(key)
        boxes = []
        for p in pieces:
            if not (isinstance(p, list) and len(p) == 2 and p[0] in tensors and isinstance(p[1], list)
                    and all(type(o) is int for o in p[1])):
                raise ManifestError(f"{where}: piece {p!r:.80} of {key!r:.80} is malformed")
            t = tensors[p[0]]
            if t[2] != code:
                raise ManifestError(f"{where}: piece {p[0]!r:.80} has dtype {t[2]}, its array {code}")
            boxes.append((p[1], t[3]))
        check_tiling(shape, boxes, f"{where}: sharded array {key!r:.80}")


def _overlaps(a: tuple[Sequence[int], Sequence[int]], b: tuple[Sequence[int], Sequence[int]]) -> bool:
    return all(ao < bo + bn and bo < ao + an
               for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True))


def pieces_needed(manifest: dict[str, Any], specs: dict[str, ShardSpec]) -> set[str] | None:
    """Tensor keys to read to serve ``specs`` (``None``: everything)."""
    if not specs or "shards" not in manifest:
        return None
    shapes = {t[0]: t[3] for t in manifest["tensors"]}
    skip = set()
    for key, _, _, pieces in manifest["shards"]:
        spec = specs.get(key)
        if spec is None:
            continue
        for pk, offs in pieces:
            if not any(_overlaps((offs, shapes[pk]), box) for box in spec.boxes):
                skip.add(pk)
    return set(shapes) - skip


@dataclass(frozen=True)
class BoxReads:
    """Where the requested boxes of sharded arrays come from (see :func:`plan_box_reads`)."""

    outs: dict[str, list[np.ndarray]]  # array key -> one fresh array per requested box
    direct: dict[str, list[tuple[int, int, np.ndarray]]]  # piece key -> (first row, end row, rows of an out)
    rows: dict[str, tuple[int, int]]  # other pieces needed in part -> (first row, end row) of the piece


def plan_box_reads(manifest: dict[str, Any], specs: dict[str, ShardSpec]) -> BoxReads:
    """Allocate the requested boxes, and find the pieces that can be read straight into
    them: those whose every overlap with a box is whole rows of both (the same extent in
    every dimension but the first), so that piece rows are contiguous bytes of the file
    and box rows contiguous memory. Of the other pieces, those needed only in part get
    the span of rows needed (read, then copied into the boxes)."""
    from .dtypes import safetensors_to_numpy

    reads = BoxReads({}, {}, {})
    if not specs or "shards" not in manifest:
        return reads
    shapes = {t[0]: tuple(t[3]) for t in manifest["tensors"]}
    for key, code, shape, pieces in manifest["shards"]:
        spec = specs.get(key)
        if spec is None:
            continue
        dtype = safetensors_to_numpy(code)
        assert dtype is not None  # validated with the manifest
        if tuple(spec.shape) != tuple(shape) or np.dtype(spec.dtype) != dtype:
            raise StateTreeError(f"sharded array {key!r}: stored {tuple(shape)} {dtype}, "
                                 f"requested {tuple(spec.shape)} {np.dtype(spec.dtype)}")
        outs = reads.outs[key] = [np.empty(tuple(b[1]), dtype=dtype) for b in spec.boxes]
        for pk, offs in pieces:
            segments = _row_segments(offs, shapes[pk], spec.boxes, outs)
            if segments:
                reads.direct[pk] = segments
            elif (span := _rows_span(offs, shapes[pk], spec.boxes)) is not None:
                reads.rows[pk] = span
    return reads


def _rows_span(offs: Sequence[int], shape: tuple[int, ...], boxes: Sequence[tuple[Sequence[int], Sequence[int]]]
               ) -> tuple[int, int] | None:
    """The rows of a piece that the boxes overlap, when that is not all of it (or none)."""
    if not shape:
        return None
    lo, hi = shape[0], 0
    for box in boxes:
        if _overlaps((offs, shape), box):
            lo = min(lo, max(box[0][0] - offs[0], 0))
            hi = max(hi, min(box[0][0] + box[1][0] - offs[0], shape[0]))
    return (lo, hi) if lo < hi and (lo, hi) != (0, shape[0]) else None


def _row_segments(offs: Sequence[int], shape: tuple[int, ...], boxes: Sequence[tuple[Sequence[int], Sequence[int]]],
                  outs: Sequence[np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
    """A piece's overlaps with the boxes as (first row, end row, destination rows) when
    each is whole rows of both and no two overlap; else ``[]``."""
    if not shape:
        return []
    segments = []
    for (b_offs, b_shape), out in zip(boxes, outs, strict=True):
        if not _overlaps((offs, shape), (b_offs, b_shape)):
            continue
        if list(b_offs[1:]) != list(offs[1:]) or list(b_shape[1:]) != list(shape[1:]):
            return []
        lo, hi = max(b_offs[0], offs[0]), min(b_offs[0] + b_shape[0], offs[0] + shape[0])
        segments.append((lo - offs[0], hi - offs[0], out[lo - b_offs[0]:hi - b_offs[0]]))
    segments.sort(key=lambda seg: seg[0])
    if any(a[1] > b[0] for a, b in zip(segments, segments[1:], strict=False)):
        return []  # the same rows wanted twice (a box requested twice): copy instead
    return segments


def resolve_pieces(manifest: dict[str, Any], arrays: dict[str, Any], specs: dict[str, ShardSpec],
                   reads: BoxReads, rows: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Replace stored pieces by whole arrays, or by the requested boxes for keys in ``specs``.

    ``reads``: the boxes (see :func:`plan_box_reads`), already filled from the pieces read
    straight into them; the other overlapping pieces are in ``arrays``, those in ``rows``
    (a subset of ``reads.rows``) only with the rows that were read."""
    from .dtypes import safetensors_to_numpy

    if "shards" not in manifest:
        return arrays
    shapes = {t[0]: tuple(t[3]) for t in manifest["tensors"]}
    for key, code, shape, pieces in manifest["shards"]:
        dtype = safetensors_to_numpy(code)
        assert dtype is not None  # validated with the manifest
        spec = specs.get(key)
        if spec is None:
            arrays[key] = assemble(tuple(shape), dtype, [(offs, arrays[pk]) for pk, offs in pieces])
        else:
            stored = [_rows_box(offs, pk, shapes[pk], rows.get(pk)) for pk, offs in pieces
                      if pk not in reads.direct]
            arrays[key] = ShardedArray(tuple(shape), dtype, tuple(
                Shard(tuple(box[0]), cut(box, stored, lambda p: arrays[p[0]], out))
                for box, out in zip(spec.boxes, reads.outs[key], strict=True)))
        for pk, _ in pieces:
            arrays.pop(pk, None)
    return arrays


def _rows_box(offs: list[int], pk: str, shape: tuple[int, ...], rows: tuple[int, int] | None
              ) -> tuple[list[int], tuple[str, tuple[int, ...]]]:
    """Where the part of piece ``pk`` that was read sits in the global array."""
    if rows is None:
        return offs, (pk, shape)
    return [offs[0] + rows[0], *offs[1:]], (pk, (rows[1] - rows[0], *shape[1:]))


def specs_from_template(template: Any) -> dict[str, ShardSpec]:
    """Tree key -> :class:`ShardSpec` for every ShardSpec/ShardedArray leaf of ``template``."""
    from .tree import path_key

    out: dict[str, ShardSpec] = {}

    def walk(node: Any, parts: list[str | int]) -> None:
        if isinstance(node, ShardSpec):
            out[path_key(parts)] = node
        elif isinstance(node, ShardedArray):
            out[path_key(parts)] = ShardSpec(node.shape, node.dtype, tuple(
                (tuple(s.offsets), tuple(s.data.shape)) for s in node.shards))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*parts, k])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, [*parts, i])

    walk(template, [])
    return out
