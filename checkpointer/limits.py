"""What every reader refuses, refused by the writer first: a save that succeeds loads.

Checked before any byte is written (:func:`check_writable`):

- every array's shape: at most ``MAX_NDIM`` dimensions, each below ``MAX_EXTENT``, and a
  zero-size array may not claim ``MAX_EXTENT`` bytes or more (readers refuse such a
  shape as hostile);
- the manifest's size against ``MAX_MANIFEST_BYTES``, estimated from above: the tree (its
  str and bytes leaves are stored there), the fields, one row per tensor, block checksums;
- one tensor's safetensors header entry against ``MAX_HEADER_BYTES`` (the files are cut so
  that no header comes near the cap, see :func:`header_bytes`).

The finished manifest is measured once more before it is written
(:func:`check_manifest_size`). Each error names the limit and the leaf.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import StateTreeError
from .format import BLOCK_BYTES, MAX_HEADER_BYTES
from .frame import FRAME_BYTES, MEMORY_PER_BYTE, memory_budget, memory_needed
from .manifest import MAX_EXTENT, MAX_MANIFEST_BYTES, MAX_NDIM, Piece
from .paths import render_path

__all__ = ["check_writable", "check_manifest_size", "header_bytes", "HEADER_BUDGET"]

HEADER_BUDGET = MAX_HEADER_BYTES // 2  # bytes of header per data file before a new file starts
_ROW = 96  # msgpack bytes of a tensor row beyond its key and shape, from above (file name, offsets, crc)


def header_bytes(key: str, shape: Sequence[int]) -> int:
    """An upper bound of the bytes ``key``'s entry takes in a safetensors header."""
    plain = key.isascii() and key.isprintable() and '"' not in key and "\\" not in key
    return (len(key) + 2 if plain else len(json.dumps(key))) + 80 + 21 * len(shape)


def _shape_error(key: str, shape: Sequence[int], itemsize: int) -> str | None:
    if len(shape) > MAX_NDIM:
        return f"{len(shape)} dimensions (readers take at most {MAX_NDIM})"
    if any(d >= MAX_EXTENT for d in shape):
        return f"a dimension of 2**62 or more (shape {tuple(shape)})"
    if math.prod(d for d in shape if d) * itemsize >= MAX_EXTENT:
        return f"shape {tuple(shape)}: its extent claims 2**62 bytes or more (readers refuse it)"
    return None


def check_writable(where: str, skeleton: Any, arrays: Sequence[tuple[str, np.ndarray]],
                   pieces: Sequence[Piece], fields: dict[str, Any]) -> None:
    """Refuse a save that a reader would refuse, before anything is written.

    Raises:
        StateTreeError: naming the limit, and the leaf that breaks it.
    """
    total = 0
    for key, arr in arrays:
        # an array that holds bytes has dimensions and an extent memory can hold
        fits = arr.ndim <= MAX_NDIM and arr.size and arr.nbytes < MAX_EXTENT
        bad = None if fits else _shape_error(key, arr.shape, arr.dtype.itemsize)
        # a JSON string takes at most 12 bytes per character: only long keys need measuring
        if bad is None and 12 * len(key) + 2048 > MAX_HEADER_BYTES - 1024 \
                and header_bytes(key, arr.shape) > MAX_HEADER_BYTES - 1024:
            bad = f"a key of {len(key)} characters: too long for a safetensors header (cap {MAX_HEADER_BYTES} bytes)"
        if bad is not None:
            raise StateTreeError(f"{where}: cannot save {key!r:.200}: {bad}")
        total += len(key.encode()) + _ROW + 9 * arr.ndim + 5 * -(-arr.nbytes // BLOCK_BYTES)
    for p in pieces:
        bad = _shape_error(p.array, p.shape, 1)
        if bad is not None:
            raise StateTreeError(f"{where}: cannot save sharded array {p.array!r:.200}: {bad}")
        total += len(p.key.encode()) + len(p.array.encode()) + 18 * len(p.shape) + 32
    try:
        total += len(msgpack.packb(fields, use_bin_type=True))
    except (OverflowError, TypeError, ValueError) as exc:
        raise StateTreeError(f"{where}: the manifest fields cannot be recorded: {exc}") from None
    if total + _packed_size(skeleton) > MAX_MANIFEST_BYTES:
        raise StateTreeError(f"{where}: the manifest would take over {MAX_MANIFEST_BYTES} bytes, "
                             f"the readers' cap ({_biggest(skeleton, len(arrays))})")


def check_manifest_size(where: str, blob: bytes) -> None:
    """The finished (framed) manifest, measured before it is written: its size (the
    estimate's safety net) and the memory readers allow for decoding it."""
    body_bytes = len(blob) - FRAME_BYTES
    if body_bytes > MAX_MANIFEST_BYTES:
        raise StateTreeError(f"{where}: the manifest takes {body_bytes} bytes, over the readers' "
                             f"cap of {MAX_MANIFEST_BYTES}: save fewer or shorter keys, or keep "
                             "large str/bytes values in arrays")
    budget = memory_budget(body_bytes)
    if memory_needed(blob, budget, FRAME_BYTES) > budget:
        raise StateTreeError(f"{where}: the manifest would decode into more than {MEMORY_PER_BYTE} "
                             "bytes of memory per byte, which readers refuse as hostile: store long "
                             "lists of empty or tiny containers as arrays")


def _packed_size(skeleton: Any) -> int:
    if _leaf_bytes_over(skeleton, MAX_MANIFEST_BYTES):  # cheap first: no 300 MiB packing
        return MAX_MANIFEST_BYTES + 1
    return len(msgpack.packb(skeleton, use_bin_type=True))


def _leaf_bytes_over(skeleton: Any, cap: int) -> bool:
    total = 0
    for _, size in _leaves(skeleton, []):
        total += size
        if total > cap:
            return True
    return False


def _leaves(node: Any, parts: list[str | int]) -> Iterator[tuple[list[str | int], int]]:
    """(path, bytes) of every str/bytes leaf and dict key in a skeleton (see tree.py)."""
    stack = [(node, parts)]
    while stack:
        node, parts = stack.pop()
        tag = node[0]
        if tag == "d":
            for k, child in node[1]:
                yield [*parts, k], len(k)
                stack.append((child, [*parts, k]))
        elif tag in ("l", "t"):
            stack.extend((child, [*parts, i]) for i, child in enumerate(node[1]))
        elif tag in ("s", "y", "a", "I"):
            yield parts, len(node[1])


def _biggest(skeleton: Any, n_arrays: int) -> str:
    """What takes the room: the largest str/bytes leaf, or the number of tensor keys."""
    leaves = list(_leaves(skeleton, []))
    path, size = max(leaves, key=lambda x: x[1], default=([], 0))
    keys = sum(s for _, s in leaves)
    if size > MAX_MANIFEST_BYTES // 16:
        return (f"the largest str/bytes leaf is {render_path(path)} with {size} bytes; "
                "store large values as arrays (np.frombuffer)")
    return f"{n_arrays} arrays, {keys} bytes of keys and str/bytes leaves; save fewer or shorter keys"
