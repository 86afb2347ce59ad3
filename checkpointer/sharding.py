"""Sharded arrays, framework-free: a global shape and dtype, and the pieces one process holds.

Adapters turn a PyTorch ``DTensor`` / FSDP2 parameter or a JAX ``jax.Array`` spread over
processes into a :class:`ShardedArray` (the pieces this process writes: replicas are
written once) and describe what a process wants back with a :class:`ShardSpec`. A
checkpoint stores each piece as its own safetensors tensor (``<key>@<o0>.<o1>...``) and
the manifest records how the pieces tile the global array; a loader reassembles the
full array, or reads only the pieces a :class:`ShardSpec` overlaps (resharding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import numpy_to_safetensors
from .errors import StateTreeError
from .manifest import Piece

__all__ = ["Shard", "ShardedArray", "ShardSpec", "piece_key", "assemble", "cut", "split_pieces"]


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


def assemble(shape: tuple[int, ...], dtype: np.dtype, pieces: Sequence[tuple[Sequence[int], np.ndarray]]) -> np.ndarray:
    """The full array from pieces already checked by :func:`checkpointer.manifest.check_tiling`."""
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
                 ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]], list[Piece]]:
    """Split flattened leaves into what this rank writes: plain arrays (the primary rank
    only: they are replicated), its pieces, and the rows describing those pieces."""
    plain: list[tuple[str, np.ndarray]] = []
    pieces: list[tuple[str, np.ndarray]] = []
    meta: list[Piece] = []
    for key, value in arrays:
        if isinstance(value, ShardedArray):
            code = numpy_to_safetensors(value.dtype)
            if code is None:
                raise StateTreeError(f"sharded array {key!r}: dtype {value.dtype} is not supported")
            for s in value.shards:
                pk = piece_key(key, s.offsets)
                pieces.append((pk, s.data))
                meta.append(Piece(key, code, value.shape, pk, tuple(int(o) for o in s.offsets),
                                  tuple(s.data.shape)))
        elif primary:
            plain.append((key, value))
    return plain, pieces, meta
