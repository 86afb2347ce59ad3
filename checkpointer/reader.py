"""Reading a checkpoint: the manifest first, then only the data files it names.

Everything read is untrusted: the manifest is validated field by field before any file is
opened, each data file's size must match the manifest before its header is parsed, and the
header must agree with the manifest tensor by tensor before anything is allocated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future
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
from .sharding import (
    ShardSpec,
    pieces_needed,
    plan_box_reads,
    resolve_pieces,
    validate_shards,
)
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
    reads = plan_box_reads(manifest, specs or {})
    # pieces whose rows fill whole rows of the requested boxes are read straight into them;
    # of the other pieces needed in part only their rows are read. Both read just the bytes
    # needed, widened to whole blocks to verify them block by block (a piece too small to
    # have blocks is read whole to verify it); with verify=False just the bytes needed.
    blocks = manifest.get("blocks", {})
    rows = {k: r for k, r in reads.rows.items() if k in blocks or not verify}
    wanted = pieces_needed(manifest, specs or {})
    whole = None if wanted is None else wanted - rows.keys() - reads.direct.keys()
    by_file: dict[str, dict[str, list[Any]]] = {f[0]: {} for f in manifest["files"]}
    for t in manifest["tensors"]:
        by_file[t[1]][t[0]] = t
    arrays: dict[str, Any] = {}
    for fname, nbytes, crc in manifest["files"]:
        expected, rel = by_file[fname], f"{name}/{fname}"
        if whole is None or whole & expected.keys():
            arrays.update(_load_file(store, rel, nbytes, crc, expected, verify, whole))
        partial = (rows.keys() | reads.direct.keys()) & expected.keys()
        if partial:
            with _open_checked(store, rel, nbytes, expected) as (f, entries, _):
                for e in entries:
                    if e.key not in partial:
                        continue
                    check = None if not verify else (manifest["block_bytes"], blocks[e.key]) \
                        if e.key in blocks else int(expected[e.key][6])
                    if e.key in rows:  # into a buffer of those rows, copied into the boxes later
                        first, end = rows[e.key]
                        arrays[e.key] = np.empty((end - first, *e.shape[1:]), dtype=e.dtype)
                        _read_into(f, store.url_of(rel), e, [(first, end, arrays[e.key])], check)
                    else:
                        _read_into(f, store.url_of(rel), e, reads.direct[e.key], check)
    if verify:  # the block checksums of the pieces read whole must agree with theirs
        for t in manifest["tensors"]:
            if t[0] in blocks and t[0] in arrays and t[0] not in rows and \
                    fmt.crc_of_blocks(blocks[t[0]], manifest["block_bytes"], t[5] - t[4]) != t[6]:
                raise ChecksumMismatchError(f"{store.url_of(name)}/{fmt.MANIFEST_NAME}: the block "
                                            f"checksums of {t[0]!r:.80} disagree with its checksum")
    arrays = resolve_pieces(manifest, arrays, specs or {}, reads, rows)
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


def _read_into(f: BinaryIO, where: str, e: fmt.HeaderEntry, rows: list[tuple[int, int, np.ndarray]],
               check: tuple[int, list[int]] | int | None) -> None:
    """Read rows of tensor ``e`` straight into their destinations (sorted, disjoint).

    ``check``: ``(block size, crc32c of each block)`` to read the blocks around the rows
    and verify them; a crc32c to read the whole tensor and verify it; ``None`` to read
    just the rows. Bytes read outside the rows go to scratch buffers.
    """
    n = e.end - e.begin
    row = n // e.shape[0] if e.shape[0] else 0
    dests = [(lo * row, hi * row, memoryview(out.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
             for lo, hi, out in rows if hi > lo and row]
    size = check[0] if isinstance(check, tuple) else 0  # block mode
    if check is None:
        covers = [(a, b) for a, b, _ in dests]
    elif not size:
        covers = [(0, n)]
    else:
        covers = []
        for a, b, _ in dests:
            a, b = a - a % size, min(-(-b // size) * size, n)
            if covers and a <= covers[-1][1]:
                covers[-1] = (covers[-1][0], max(covers[-1][1], b))
            else:
                covers.append((a, b))
    chain: Future[int] | None = None
    done: list[tuple[int, Future[int]]] = []  # (block index, its crc32c) in block mode
    for c0, c1 in covers:
        f.seek(e.begin + c0)
        pos = c0
        for view in _cover_parts(c0, c1, dests):
            off = 0
            while off < len(view):
                # chunks never straddle a block, so each block's crc is one chain
                limit = min(len(view) - off, _CHUNK, size - pos % size if size else _CHUNK)
                k = f.readinto(view[off:off + limit])  # type: ignore[attr-defined]
                if not k:
                    raise TruncatedFileError(f"{where}: tensor {e.key!r:.80} is cut short")
                if check is not None:
                    chain = fmt.chain_crc(chain, view[off:off + k])
                off, pos = off + k, pos + k
                if size and (pos % size == 0 or pos == c1):
                    assert chain is not None
                    done.append(((pos - 1) // size, chain))
                    chain = None
    if isinstance(check, int):
        if (0 if chain is None else chain.result()) != check:
            raise ChecksumMismatchError(f"{where}: tensor {e.key!r:.80} fails its crc32c checksum")
    elif check is not None:
        for i, crc in done:
            if crc.result() != check[1][i]:
                raise ChecksumMismatchError(f"{where}: tensor {e.key!r:.80} fails the crc32c "
                                            f"checksum of its block {i}")


_CHUNK = 8 << 20


def _cover_parts(c0: int, c1: int, dests: list[tuple[int, int, memoryview]]) -> list[memoryview]:
    """Where the bytes ``[c0, c1)`` of a tensor go, in order: the destinations' views, and
    scratch buffers for the bytes between or around them."""
    parts: list[memoryview] = []
    at = c0
    for a, b, view in dests:
        if b <= at or a >= c1:
            continue
        if a > at:
            parts.append(memoryview(np.empty(a - at, dtype=np.uint8)))  # type: ignore[arg-type]
            at = a
        parts.append(view[at - a:min(b, c1) - a])
        at = min(b, c1)
    if at < c1:
        parts.append(memoryview(np.empty(c1 - at, dtype=np.uint8)))  # type: ignore[arg-type]
    return parts


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
