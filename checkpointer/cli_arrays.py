"""A checkpoint as the user saved it, for ``inspect``, ``diff`` and ``export``: its logical
arrays (a sharded array once, with its global shape, not its stored pieces) and its plain
values, in tree order, keys unescaped; one array read at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from .cli_common import display_key
from .dtypes import safetensors_to_numpy
from .errors import ManifestError
from .manifest import MANIFEST_NAME, Manifest, PieceRow
from .reader import CheckpointReader
from .tree import unflatten

__all__ = ["Array", "arrays", "values", "read_array", "dtype_name", "walk"]


@dataclass(frozen=True)
class Array:
    """One array leaf: its tree key (escaped, as stored), how to show it, dtype (safetensors
    code), global shape, its bytes, and where it lives (a file, or its pieces)."""

    key: str
    name: str
    code: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    pieces: tuple[PieceRow, ...] = ()

    @property
    def dtype(self) -> np.dtype:
        dtype = safetensors_to_numpy(self.code)
        assert dtype is not None, "allow-listed when the manifest was read"
        return dtype


def dtype_name(code: str) -> str:
    """``float32``, ``bfloat16``, ... for a safetensors dtype code."""
    dtype = safetensors_to_numpy(code)
    return dtype.name if dtype is not None else code


class _Leaf:
    """Stands for an array while the skeleton is rebuilt without reading data."""

    def __init__(self, key: str) -> None:
        self.key = key


def walk(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` of every leaf of a rebuilt tree, in order; paths ``a/b/0``, the root
    itself ``""``."""
    out: list[tuple[str, Any]] = []

    def visit(node: Any, parts: list[str]) -> None:
        if isinstance(node, (dict, list, tuple)) and not node:  # an empty container is a value too
            out.append(("/".join(parts), node))
        elif isinstance(node, dict):
            for k, v in node.items():
                visit(v, [*parts, k])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, [*parts, str(i)])
        else:
            out.append(("/".join(parts), node))

    visit(tree, [])
    return out


def _leaves(manifest: Manifest) -> list[tuple[str, Any]]:
    return walk(unflatten(manifest.tree, lambda key: cast(np.ndarray, _Leaf(key))))


def arrays(manifest: Manifest, url: str) -> list[Array]:
    """The array leaves in tree order; a sharded array as one logical array.

    Raises:
        ManifestError: the tree names an array that is not stored (``url``: the checkpoint's).
    """
    plain = {t.key: t for t in manifest.tensors}
    shards = {s.key: s for s in manifest.shards}
    out = []
    for _, leaf in _leaves(manifest):
        if not isinstance(leaf, _Leaf):
            continue
        if leaf.key in shards:
            s = shards[leaf.key]
            itemsize = _itemsize(s.dtype)
            files = sorted({plain[p.key].file for p in s.pieces})
            out.append(Array(s.key, display_key(s.key), s.dtype, s.shape, math.prod(s.shape) * itemsize,
                             f"{len(s.pieces)} pieces in {len(files)} file{'s' * (len(files) != 1)}",
                             s.pieces))
        elif leaf.key not in plain:
            raise ManifestError(f"{url}/{MANIFEST_NAME}: the tree names array {leaf.key!r:.80}, "
                                "which is not stored")
        else:
            t = plain[leaf.key]
            out.append(Array(t.key, display_key(t.key), t.dtype, t.shape, t.nbytes, t.file))
    return out


def _itemsize(code: str) -> int:
    dtype = safetensors_to_numpy(code)
    return dtype.itemsize if dtype is not None else 0


def values(manifest: Manifest) -> dict[str, Any]:
    """The plain (non-array) leaves by path, ``a/b/0``; the root itself under ``""``."""
    return {path: v for path, v in _leaves(manifest) if not isinstance(v, _Leaf)}


def read_array(reader: CheckpointReader, a: Array) -> np.ndarray:
    """Array ``a`` read from ``reader`` (pieces assembled), every checksum checked."""
    if not a.pieces:
        return reader.tensor(a.key)
    out = np.empty(a.shape, dtype=a.dtype)
    for p in a.pieces:
        data = reader.tensor(p.key)
        out[tuple(slice(o, o + n) for o, n in zip(p.offsets, data.shape, strict=True))] = data
    return out
