"""Copying a committed checkpoint to another directory (any store), verified as it streams.

:func:`copy_checkpoint` reads the source's manifest, streams each data file through one
reused buffer into the destination, checking every tensor's crc32c and each file's
checksum on the way, then commits the copy with the same protocol as a save (a temporary
folder renamed into place, or data objects then the manifest object): a copy is never
visible half-written, and a source byte that does not match its checksum stops the copy
with a :class:`~checkpointer.errors.CorruptCheckpointError` before anything shows.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import partial
from typing import Any

from .checksum import crc32c
from .commit import Committed, commit_copy
from .errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    TrailingDataError,
    TruncatedFileError,
)
from .manifest import FileRow, Manifest, TensorRow, read_manifest
from .storage import Store

__all__ = ["copy_checkpoint", "copy_with_manifest", "COPY_CHUNK"]

COPY_CHUNK = 8 << 20


def copy_checkpoint(src: Store, name: str, dst: Store) -> Committed:
    """Copy checkpoint ``name`` from ``src`` to ``dst`` (replacing one of that name there).

    Raises:
        CheckpointNotFoundError: ``src`` holds no checkpoint ``name``.
        CorruptCheckpointError: (a subclass of) a byte of the source fails its checksum.
        StorageError: either store fails.
    """
    return copy_with_manifest(src, name, dst)[0]


def copy_with_manifest(src: Store, name: str, dst: Store) -> tuple[Committed, Manifest]:
    """:func:`copy_checkpoint`, and the source manifest the copy was made from (its fields
    are the copy's: what was copied, even when ``name`` was replaced in ``src`` meanwhile)."""
    manifest = read_manifest(src, name)
    return commit_copy(dst, name, manifest, partial(_copy_files, src, name, manifest)), manifest


def _copy_files(src: Store, name: str, manifest: Manifest, dst: Store, folder: str, prefix: str
                ) -> tuple[list[FileRow], list[TensorRow]]:
    renamed = {f.name: f"{prefix}{i:05d}.safetensors" for i, f in enumerate(manifest.files)}
    by_file = manifest.by_file()
    buf = bytearray(COPY_CHUNK)
    for f in manifest.files:
        rows = sorted(by_file[f.name].values(), key=lambda t: t.begin)
        _copy_file(src, f"{name}/{f.name}", dst, f"{folder}/{renamed[f.name]}", f, rows, buf)
    files = [f._replace(name=renamed[f.name]) for f in manifest.files]
    return files, [t._replace(file=renamed[t.file]) for t in manifest.tensors]


def _copy_file(src: Store, rel: str, dst: Store, out: str, row: FileRow, tensors: Sequence[TensorRow],
               buf: bytearray) -> None:
    where = src.url_of(rel)
    head_end = tensors[0].begin if tensors else row.nbytes
    view = memoryview(buf)
    with src.open_read(rel) as f, dst.writer(out, row.nbytes) as w:
        head = _stream(f, w, view, head_end, where)
        crcs = []
        at = head_end
        for t in tensors:
            if t.begin != at:
                raise CorruptCheckpointError(f"{where}: tensor {t.key!r:.80} does not follow the one before")
            if _stream(f, w, view, t.nbytes, where) != t.crc32c:
                raise ChecksumMismatchError(f"{where}: tensor {t.key!r:.80} does not match its checksum")
            crcs.append(t.crc32c)
            at = t.end
        if at != row.nbytes:
            raise CorruptCheckpointError(f"{where}: the tensors end at byte {at}, the file at {row.nbytes}")
        if f.read(1):
            raise TrailingDataError(f"{where}: bytes after the last tensor")
    whole = crc32c(struct.pack(f"<{len(crcs)}I", *crcs), head) if crcs else head
    if whole != row.crc32c:
        raise ChecksumMismatchError(f"{where}: the file does not match its checksum")


def _stream(f: Any, w: Any, view: memoryview, n: int, where: str) -> int:
    """Copy ``n`` bytes from ``f`` to ``w`` through ``view``; their crc32c."""
    crc = 0
    while n:
        got = f.readinto(view[:min(n, len(view))])
        if not got:
            raise TruncatedFileError(f"{where}: the file ends {n} bytes early")
        chunk = view[:got]
        w.write(chunk)
        crc = crc32c(chunk, crc)
        n -= got
    return crc
