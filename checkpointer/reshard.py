"""Reading sharded arrays back as other boxes than they were written in (resharding).

A process asks for boxes of a sharded array with a :class:`~checkpointer.sharding.ShardSpec`.
:func:`plan_box_reads` finds, from the manifest alone, which stored pieces overlap them and
how: a piece whose every overlap is whole rows of both is read straight into the boxes, a
piece needed in part gets the span of its rows to read, the others are skipped.
:func:`resolve_pieces` then turns the pieces read into whole arrays or the requested boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import safetensors_to_numpy
from .errors import StateTreeError
from .manifest import Manifest
from .sharding import Shard, ShardedArray, ShardSpec, assemble, cut

__all__ = ["BoxReads", "pieces_needed", "plan_box_reads", "resolve_pieces"]

Box = tuple[Sequence[int], Sequence[int]]


def _overlaps(a: Box, b: Box) -> bool:
    return all(ao < bo + bn and bo < ao + an
               for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True))


def pieces_needed(manifest: Manifest, specs: dict[str, ShardSpec]) -> set[str] | None:
    """Tensor keys to read to serve ``specs`` (``None``: everything)."""
    if not specs or not manifest.shards:
        return None
    shapes = {t.key: t.shape for t in manifest.tensors}
    skip = set()
    for shard in manifest.shards:
        spec = specs.get(shard.key)
        if spec is None:
            continue
        for p in shard.pieces:
            if not any(_overlaps((p.offsets, shapes[p.key]), box) for box in spec.boxes):
                skip.add(p.key)
    return set(shapes) - skip


@dataclass(frozen=True)
class BoxReads:
    """Where the requested boxes of sharded arrays come from (see :func:`plan_box_reads`)."""

    outs: dict[str, list[np.ndarray]]  # array key -> one fresh array per requested box
    direct: dict[str, list[tuple[int, int, np.ndarray]]]  # piece key -> (first row, end row, rows of an out)
    rows: dict[str, tuple[int, int]]  # other pieces needed in part -> (first row, end row) of the piece


def plan_box_reads(manifest: Manifest, specs: dict[str, ShardSpec]) -> BoxReads:
    """Allocate the requested boxes, and find the pieces that can be read straight into
    them: those whose every overlap with a box is whole rows of both (the same extent in
    every dimension but the first), so that piece rows are contiguous bytes of the file
    and box rows contiguous memory. Of the other pieces, those needed only in part get
    the span of rows needed (read, then copied into the boxes)."""
    reads = BoxReads({}, {}, {})
    if not specs or not manifest.shards:
        return reads
    shapes = {t.key: t.shape for t in manifest.tensors}
    for shard in manifest.shards:
        spec = specs.get(shard.key)
        if spec is None:
            continue
        dtype = safetensors_to_numpy(shard.dtype)
        assert dtype is not None  # validated with the manifest
        if tuple(spec.shape) != shard.shape or np.dtype(spec.dtype) != dtype:
            raise StateTreeError(f"sharded array {shard.key!r}: stored {shard.shape} {dtype}, "
                                 f"requested {tuple(spec.shape)} {np.dtype(spec.dtype)}")
        outs = reads.outs[shard.key] = [np.empty(tuple(b[1]), dtype=dtype) for b in spec.boxes]
        for p in shard.pieces:
            segments = _row_segments(p.offsets, shapes[p.key], spec.boxes, outs)
            if segments:
                reads.direct[p.key] = segments
            elif (span := _rows_span(p.offsets, shapes[p.key], spec.boxes)) is not None:
                reads.rows[p.key] = span
    return reads


def _rows_span(offs: Sequence[int], shape: tuple[int, ...], boxes: Sequence[Box]) -> tuple[int, int] | None:
    """The rows of a piece that the boxes overlap, when that is not all of it (or none)."""
    if not shape:
        return None
    lo, hi = shape[0], 0
    for box in boxes:
        if _overlaps((offs, shape), box):
            lo = min(lo, max(box[0][0] - offs[0], 0))
            hi = max(hi, min(box[0][0] + box[1][0] - offs[0], shape[0]))
    return (lo, hi) if lo < hi and (lo, hi) != (0, shape[0]) else None


def _row_segments(offs: Sequence[int], shape: tuple[int, ...], boxes: Sequence[Box],
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


def resolve_pieces(manifest: Manifest, arrays: dict[str, Any], specs: dict[str, ShardSpec],
                   reads: BoxReads, rows: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Replace stored pieces by whole arrays, or by the requested boxes for keys in ``specs``.

    ``reads``: the boxes (see :func:`plan_box_reads`), already filled from the pieces read
    straight into them; the other overlapping pieces are in ``arrays``, those in ``rows``
    (a subset of ``reads.rows``) only with the rows that were read."""
    shapes = {t.key: t.shape for t in manifest.tensors}
    for shard in manifest.shards:
        dtype = safetensors_to_numpy(shard.dtype)
        assert dtype is not None  # validated with the manifest
        spec = specs.get(shard.key)
        if spec is None:
            arrays[shard.key] = assemble(shard.shape, dtype, [(p.offsets, arrays[p.key]) for p in shard.pieces])
        else:
            stored = [_rows_box(p.offsets, p.key, shapes[p.key], rows.get(p.key)) for p in shard.pieces
                      if p.key not in reads.direct]
            arrays[shard.key] = ShardedArray(shard.shape, dtype, tuple(
                Shard(tuple(box[0]), cut(box, stored, lambda p: arrays[p[0]], out))
                for box, out in zip(spec.boxes, reads.outs[shard.key], strict=True)))
        for p in shard.pieces:
            arrays.pop(p.key, None)
    return arrays


def _rows_box(offs: Sequence[int], pk: str, shape: tuple[int, ...], rows: tuple[int, int] | None
              ) -> tuple[Sequence[int], tuple[str, tuple[int, ...]]]:
    """Where the part of piece ``pk`` that was read sits in the global array."""
    if rows is None:
        return offs, (pk, shape)
    return [offs[0] + rows[0], *offs[1:]], (pk, (rows[1] - rows[0], *shape[1:]))
