"""Reading a checkpoint: the manifest first, then only the data files it names.

Everything read is untrusted: the manifest is validated field by field before any file is
opened, each data file's size must match the manifest before its header is parsed, and the
header must agree with the manifest tensor by tensor before anything is allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from . import format as fmt
from .errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    DuplicateKeyError,
    ManifestError,
    TrailingDataError,
    TruncatedFileError,
)
from .gcpause import without_gc
from .sharding import ShardSpec, pieces_needed, resolve_pieces, rows_needed, validate_shards
from .storage import Store

__all__ = ["MANIFEST_MAGIC", "read_manifest", "load_checkpoint"]

MANIFEST_MAGIC = b"CKPTMAN1"

_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "version": int, "tree": list, "files": list, "tensors": list,
}


def _ints(xs: Any) -> bool:
    if type(xs) is not list:
        return False
    for x in xs:
        if type(x) is not int:
            return False
    return True


def read_manifest(store: Store, name: str) -> dict[str, Any]:
    """Decode and validate ``name``'s manifest (not its data files)."""
    where = store.url_of(f"{name}/{fmt.MANIFEST_NAME}")
    try:
        size = store.size(f"{name}/{fmt.MANIFEST_NAME}")
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{store.url_of(name)} is not a checkpoint (no manifest)") from None
    if size > fmt.MAX_MANIFEST_BYTES + 64:
        raise ManifestError(f"{where}: {size} bytes, over the cap of {fmt.MAX_MANIFEST_BYTES}")
    m = fmt.decode_framed(store.read_bytes(f"{name}/{fmt.MANIFEST_NAME}"), MANIFEST_MAGIC, where)
    if not isinstance(m, dict) or any(not isinstance(m.get(k), t) for k, t in _MANIFEST_FIELDS.items()):
        raise ManifestError(f"{where}: required fields missing or of the wrong type")
    if m["format"] != "checkpointer" or m["version"] != fmt.FORMAT_VERSION:
        raise ManifestError(f"{where}: format {m['format']!r} version {m['version']!r} is not supported")
    names = set()
    for f in m["files"]:
        if not (isinstance(f, list) and len(f) == 3 and all(type(x) is int for x in f[1:])):
            raise ManifestError(f"{where}: file entry {f!r:.80} is malformed")
        fmt.check_file_name(f[0], where)
        if f[0] in names or f[0] == fmt.MANIFEST_NAME:
            raise DuplicateKeyError(f"{where}: file {f[0]!r} listed twice")
        names.add(f[0])
    keys = set()
    for t in m["tensors"]:
        if not (type(t) is list and len(t) == 7 and type(t[0]) is str and t[1] in names
                and type(t[2]) is str and _ints(t[3]) and type(t[4]) is int and type(t[5]) is int
                and type(t[6]) is int):
            raise ManifestError(f"{where}: tensor entry {t!r:.80} is malformed")
        if t[0] in keys:
            raise DuplicateKeyError(f"{where}: tensor {t[0]!r:.80} listed twice")
        keys.add(t[0])
    if "shards" in m:
        validate_shards(m, where)
    if "blocks" in m or "block_bytes" in m:
        _validate_blocks(m, where)
    return m


def _validate_blocks(m: dict[str, Any], where: str) -> None:
    """``block_bytes`` and ``blocks`` (piece key -> crc32c of each block) must agree with
    the tensors they describe."""
    size, blocks = m.get("block_bytes"), m.get("blocks")
    if type(size) is not int or not 4096 <= size <= 1 << 30 or size % 64 or not isinstance(blocks, dict):
        raise ManifestError(f"{where}: 'block_bytes' / 'blocks' are malformed")
    lengths = {t[0]: t[5] - t[4] for t in m["tensors"]}
    for key, crcs in blocks.items():
        n = lengths.get(key)
        if n is None or not _ints(crcs) or len(crcs) != -(-n // size) or any(not 0 <= c < 1 << 32 for c in crcs):
            raise ManifestError(f"{where}: block checksums of {key!r:.80} are malformed")


@without_gc
def load_checkpoint(store: Store, name: str, *, verify: bool = True,
                    specs: dict[str, ShardSpec] | None = None) -> tuple[Any, dict[str, Any]]:
    """Read checkpoint ``name``: ``(tree, manifest)``. Verifies every checksum unless told not to.

    Sharded arrays come back whole, except those whose tree key is in ``specs``: those come
    back as :class:`~checkpointer.sharding.ShardedArray` holding just the requested boxes,
    and only the stored pieces overlapping them are read.
    """
    from .tree import unflatten

    manifest = read_manifest(store, name)
    wanted = pieces_needed(manifest, specs or {})
    # pieces needed in part: only their rows are read, verified block by block (or not at
    # all with verify=False); a piece without block checksums is read whole to verify it
    blocks = manifest.get("blocks", {})
    rows = {k: r for k, r in rows_needed(manifest, specs or {}).items() if k in blocks or not verify}
    by_file: dict[str, dict[str, list[Any]]] = {f[0]: {} for f in manifest["files"]}
    for t in manifest["tensors"]:
        by_file[t[1]][t[0]] = t
    arrays: dict[str, Any] = {}
    for fname, nbytes, crc in manifest["files"]:
        expected = by_file[fname]
        if wanted is None or (wanted - rows.keys()) & expected.keys():
            arrays.update(_load_file(store, f"{name}/{fname}", nbytes, crc, expected, verify,
                                     None if wanted is None else wanted - rows.keys()))
        for key in rows.keys() & expected.keys():
            arrays[key] = _load_rows(store, f"{name}/{fname}", nbytes, expected, key, rows[key],
                                     (manifest.get("block_bytes", 0), blocks.get(key)) if verify else None)
    arrays = resolve_pieces(manifest, arrays, specs or {}, rows)
    try:
        return unflatten(manifest["tree"], arrays), manifest
    except ManifestError as exc:
        raise ManifestError(f"{store.url_of(name)}/{fmt.MANIFEST_NAME}: {exc}") from None


@contextlib.contextmanager
def _open_checked(store: Store, rel: str, nbytes: int, expected: dict[str, list[Any]]
                  ) -> Iterator[tuple[BinaryIO, list[fmt.HeaderEntry], int]]:
    """A data file whose size and header agree with the manifest: (file, entries, header crc)."""
    where = store.url_of(rel)
    try:
        size = store.size(rel)
    except CheckpointNotFoundError:
        raise ManifestError(f"{where}: data file named by the manifest is missing") from None
    if size < nbytes:
        raise TruncatedFileError(f"{where}: {size} bytes, the manifest says {nbytes}")
    if size > nbytes:
        raise TrailingDataError(f"{where}: {size} bytes, the manifest says {nbytes}")
    with store.open_read(rel) as f:
        entries, head_crc = fmt.read_header(f, size, where)
        if len(entries) != len(expected) or any(
                (t := expected.get(e.key)) is None or t[2] != e.code or t[4] != e.begin
                or t[5] != e.end or t[3] != list(e.shape) for e in entries):
            raise ManifestError(f"{where}: tensors in the file disagree with the manifest")
        yield f, entries, head_crc


def _load_rows(store: Store, rel: str, nbytes: int, expected: dict[str, list[Any]], key: str,
               rows: tuple[int, int], blocks: tuple[int, list[int] | None] | None) -> np.ndarray:
    """Rows ``rows`` of tensor ``key``: only their bytes are read, widened to whole blocks
    when ``blocks`` (block size, crc32c of each block) is given, and those are verified."""
    where = store.url_of(rel)
    with _open_checked(store, rel, nbytes, expected) as (f, entries, _):
        e = next(e for e in entries if e.key == key)
        row_bytes = (e.end - e.begin) // e.shape[0]
        lo, hi = rows[0] * row_bytes, rows[1] * row_bytes
        first, end = lo, hi
        if blocks is not None:
            size = blocks[0]
            first, end = lo - lo % size, min(-(-hi // size) * size, e.end - e.begin)
        buf = np.empty(end - first, dtype=np.uint8)
        f.seek(e.begin + first)
        view, got = memoryview(buf), 0  # type: ignore[arg-type]
        while got < len(buf):
            n = f.readinto(view[got:])  # type: ignore[attr-defined]
            if not n:
                raise TruncatedFileError(f"{where}: tensor {key!r:.80} is cut short")
            got += n
    if blocks is not None:
        size, crcs = blocks[0], blocks[1] or []
        for i in range(0, len(buf), size):
            if fmt.crc32c(view[i:i + size]) != crcs[(first + i) // size]:
                raise ChecksumMismatchError(f"{where}: tensor {key!r:.80} fails the crc32c checksum "
                                            f"of its block {(first + i) // size}")
    return buf[lo - first:hi - first].view(e.dtype).reshape((rows[1] - rows[0], *e.shape[1:]))


def _load_file(store: Store, rel: str, nbytes: int, crc: int, expected: dict[str, list[Any]],
               verify: bool, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    where = store.url_of(rel)
    with _open_checked(store, rel, nbytes, expected) as (f, entries, head_crc):
        crcs = {k: t[6] for k, t in expected.items()} if verify else None
        if wanted is not None and not expected.keys() <= wanted:
            entries = [e for e in entries if e.key in wanted]
            return fmt.read_tensors(f, entries, crcs, where, head_crc)[0]
        arrays, file_crc = fmt.read_tensors(f, entries, crcs, where, head_crc)
    if verify and file_crc != crc:
        raise ChecksumMismatchError(f"{where}: file checksum does not match")
    return arrays
