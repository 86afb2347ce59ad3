"""``checkpointer.open``: one checkpoint, its manifest read, then only the tensors asked for.

``checkpointer.open(url)`` reads and verifies the manifest (one small read) and nothing
else; :meth:`CheckpointReader.tensor` then reads a single tensor with one seek and one
``readinto`` into a fresh array and checks its own crc32c, whatever the size of the rest
of the checkpoint. Every range comes from the validated manifest (allow-listed dtype,
shape matching the byte range, range inside its file, the file's real size checked).

Example::

    with checkpointer.open("ckpts/epoch0010") as ckpt:
        print(ckpt.keys())
        w = ckpt.tensor("model/layer0/weight")
        tree = ckpt.state(lazy=True)          # array leaves are LazyTensor
        bias = tree["model"]["bias"].load()
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import numpy as np

from .errors import ConfigurationError
from .format import HeaderEntry
from .load import load_checkpoint
from .manifest import MANIFEST_NAME, Manifest, TensorRow, read_manifest
from .reading import checked_header, entry_of, memory_guard, open_data, read_tensors
from .storage import Store, open_store, split_url
from .tree import unflatten

__all__ = ["open", "CheckpointReader", "LazyTensor"]


class LazyTensor:
    """A tensor of an open checkpoint, read on :meth:`load` (or ``np.asarray``)."""

    __slots__ = ("_reader", "key", "dtype", "shape")

    def __init__(self, reader: CheckpointReader, key: str, dtype: np.dtype, shape: tuple[int, ...]):
        self._reader, self.key, self.dtype, self.shape = reader, key, dtype, shape

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    def load(self, *, verify: bool = True) -> np.ndarray:
        """Read the tensor now (a fresh array); its crc32c is checked unless ``verify=False``."""
        return self._reader.tensor(self.key, verify=verify)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.load()
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, dtype={self.dtype}, shape={self.shape})"


class CheckpointReader:
    """An open checkpoint: its manifest in memory, data files opened on first use.

    Use :func:`open` to create one; close it (or use ``with``) to release file handles.
    """

    def __init__(self, store: Store, name: str) -> None:
        self._store, self.name = store, name
        with memory_guard(f"open {store.url_of(name)}"):
            self.manifest: Manifest = read_manifest(store, name)
        self._sizes = {f.name: f.nbytes for f in self.manifest.files}
        self._tensors: dict[str, TensorRow] = {t.key: t for t in self.manifest.tensors}
        self._handles: dict[str, BinaryIO] = {}
        self._by_file = self.manifest.by_file()

    @property
    def url(self) -> str:
        """The checkpoint's URL or path."""
        return self._store.url_of(self.name)

    def keys(self) -> list[str]:
        """Tensor keys (tree paths), in storage order."""
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> LazyTensor:
        """dtype and shape of tensor ``key`` without reading it."""
        entry = self._entry(key)
        return LazyTensor(self, key, entry.dtype, entry.shape)

    def tensor(self, key: str, *, verify: bool = True) -> np.ndarray:
        """Read tensor ``key`` alone into a fresh array, checking its crc32c unless told not to.

        Allocates the tensor's own memory, nothing in proportion to the rest of the file.

        Raises:
            KeyError: no tensor ``key``.
            CorruptCheckpointError: (a subclass of) the data file or the bytes are bad.
            CheckpointError: not enough memory for the tensor (the message says how much).
        """
        row = self._tensors[key]
        crc = {key: row.crc32c} if verify else None
        entry = self._entry(key)
        where = self._store.url_of(f"{self.name}/{row.file}")
        return read_tensors(self._handle(row.file), [entry], crc, where)[0][key]

    def state(self, lazy: bool = False, *, verify: bool = True) -> Any:
        """The whole state tree: eager (every file read and verified, as ``load``), or with
        :class:`LazyTensor` leaves when ``lazy``.

        Raises:
            ConfigurationError: ``lazy`` on a sharded checkpoint (its arrays are pieces).
        """
        if not lazy:
            return load_checkpoint(self._store, self.name, verify=verify)[0]
        if self.manifest.shards:
            raise ConfigurationError(f"{self.url}: a sharded checkpoint has no lazy state; use state()")
        leaves = {k: self.info(k) for k in self._tensors}
        return unflatten(self.manifest.tree, cast(dict[str, np.ndarray], leaves))

    def _entry(self, key: str) -> HeaderEntry:
        row = self._tensors[key]
        return entry_of(row, self._sizes[row.file], self._store.url_of(f"{self.name}/{MANIFEST_NAME}"))

    def _handle(self, fname: str) -> BinaryIO:
        f = self._handles.get(fname)
        if f is None:  # first use: its header must agree with the manifest, as for a load
            rel = f"{self.name}/{fname}"
            f = open_data(self._store, rel, self._sizes[fname])
            try:
                checked_header(f, self._sizes[fname], self._by_file[fname], self._store.url_of(rel))
            except BaseException:
                f.close()
                raise
            self._handles[fname] = f
        return f

    def close(self) -> None:
        """Close the data files opened so far."""
        handles, self._handles = self._handles, {}
        for f in handles.values():
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({self.url!r}, {len(self)} tensors)"


def open(
    url: str | os.PathLike[str],
    *,  # noqa: A001 - mirrors builtins.open / safe_open
    storage_options: dict[str, Any] | None = None,
) -> CheckpointReader:
    """Open the checkpoint folder ``url`` for lazy reading (reads only its manifest).

    Raises:
        CheckpointNotFoundError: ``url`` holds no checkpoint.
        CorruptCheckpointError: (a subclass of) the manifest is damaged.
    """
    parent, name = split_url(os.fspath(url))
    return CheckpointReader(open_store(parent, storage_options), name)
