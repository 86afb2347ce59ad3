"""The read engine: every byte of a data file is read here, eager, lazy and resharding alike.

A data file is opened only after its size matches the manifest and its header agrees with the
manifest tensor by tensor (:func:`open_checked`), so every range read is one the manifest
and the header both vouch for. Three ways to read, one set of rules:

- :func:`read_tensors`: whole tensors into fresh memory, small neighbours sharing one buffer;
- :func:`read_rows`: rows of one tensor straight into their destinations (resharding), the
  blocks around them verified block by block;
- :func:`verify_file`: every checksum of a file through two reused buffers (bounded memory).

A big tensor is checksummed chunk by chunk on the checksum helper thread while the next
chunk is read (both release the GIL), so verification hides behind the reads.

Memory: a read allocates what it returns and nothing in proportion to the rest of the
file. When that memory is not there (a file's declared size is not its size on disk: a
sparse file, or a limit on the process), the ``MemoryError`` becomes a
:class:`~checkpointer.errors.CheckpointError` saying what needed how many bytes
(:func:`allocate`, :func:`memory_guard`): a shortage of memory is not damage, so it is no
``CorruptCheckpointError``.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, BinaryIO

import numpy as np

from .checksum import chain_crc, crc32c, crc_of_blocks, crcs_later
from .dtypes import SAFETENSORS_TO_NUMPY, safetensors_to_numpy
from .errors import (
    CheckpointNotFoundError,
    ChecksumMismatchError,
    InsufficientMemoryError,
    InvalidOffsetsError,
    ManifestError,
    TrailingDataError,
    TruncatedFileError,
)
from .format import HeaderEntry, raw_bytes, read_header
from .manifest import FileRow, TensorRow
from .storage import Store

__all__ = ["open_checked", "checked_header", "open_data", "entry_of", "read_tensors", "read_rows", "verify_file",
           "check_block_sum", "allocate", "memory_guard"]

_OWN = 4 << 20
_PIPELINE = 16 << 20
_PIPE_CHUNK = 8 << 20
_RUN_CHUNK = 4 << 20  # small tensors' reads: smaller chunks, so their checksums start sooner
# the checksum helper thread helps only when another core can run it
_SPARE_CORE = len(os.sched_getaffinity(0)) > 1 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > 1
_READ_CHUNK = 64 << 20
_CHUNK = 8 << 20


def allocate(shape: tuple[int, ...], dtype: np.dtype | type, where: str, what: str) -> np.ndarray:
    """``np.empty(shape, dtype)``; when the memory is not there, a CheckpointError naming
    ``what`` the memory was for and how many bytes it needed."""
    try:
        return np.empty(shape, dtype=dtype)
    except MemoryError:
        need = math.prod(shape) * np.dtype(dtype).itemsize
        raise InsufficientMemoryError(f"{where}: not enough memory to read {what}: {need} bytes needed") from None


@contextlib.contextmanager
def memory_guard(what: str) -> Iterator[None]:
    """A MemoryError inside becomes an InsufficientMemoryError: ``not enough memory to
    <what>`` (one raised inside already, saying how many bytes, passes unchanged)."""
    try:
        yield
    except InsufficientMemoryError:
        raise
    except MemoryError:
        raise InsufficientMemoryError(f"not enough memory to {what}") from None


def _size_checked(store: Store, rel: str, nbytes: int) -> int:
    """The real size of data file ``rel``, which must be the manifest's."""
    where = store.url_of(rel)
    try:
        size = store.size(rel)
    except CheckpointNotFoundError:
        raise ManifestError(f"{where}: data file named by the manifest is missing") from None
    if size < nbytes:
        raise TruncatedFileError(f"{where}: {size} bytes, the manifest says {nbytes}")
    if size > nbytes:
        raise TrailingDataError(f"{where}: {size} bytes, the manifest says {nbytes}")
    return size


def open_data(store: Store, rel: str, nbytes: int) -> BinaryIO:
    """Data file ``rel`` for reading ranges the manifest vouches for (its size checked)."""
    _size_checked(store, rel, nbytes)
    return store.open_read(rel)


@contextlib.contextmanager
def open_checked(store: Store, rel: str, file: FileRow, expected: Mapping[str, TensorRow]
                 ) -> Iterator[tuple[BinaryIO, list[HeaderEntry], int]]:
    """A data file whose size and header agree with the manifest: (file, entries, header crc)."""
    where = store.url_of(rel)
    size = _size_checked(store, rel, file.nbytes)
    with store.open_read(rel) as f:
        entries, head_crc = checked_header(f, size, expected, where)
        yield f, entries, head_crc


def checked_header(f: BinaryIO, size: int, expected: Mapping[str, TensorRow], where: str
                   ) -> tuple[list[HeaderEntry], int]:
    """The header of an open data file, which must list exactly the ``expected`` rows
    (dtype, shape and byte range each): (entries, header crc)."""
    matched: list[bool] = []  # whether the entries are the expected rows themselves
    entries, head_crc = read_header(f, size, where, partial(_as_expected, expected, matched))
    if not matched and (len(entries) != len(expected) or any(
            (t := expected.get(e.key)) is None or t.dtype != e.code or t.begin != e.begin
            or t.end != e.end or t.shape != e.shape for e in entries)):
        raise ManifestError(f"{where}: tensors in the file disagree with the manifest")
    return entries, head_crc


def _as_expected(expected: Mapping[str, TensorRow], matched: list[bool], header: dict[str, Any], base: int
                 ) -> list[HeaderEntry] | None:
    """The entries when ``header`` lists exactly the ``expected`` rows (which the manifest's
    validation vouches for): no entry then needs checking again (``matched`` records it).
    ``None`` at the first difference: the caller validates each entry, naming what is wrong."""
    if len(header) != len(expected):
        return None
    out = []
    make, numpy_dtype = tuple.__new__, SAFETENSORS_TO_NUMPY  # a hot loop: a row per tensor
    for key, info in header.items():
        t = expected.get(key)
        if t is None or info != {"dtype": t.dtype, "shape": list(t.shape),
                                 "data_offsets": [t.begin - base, t.end - base]}:
            return None
        out.append(make(HeaderEntry, (key, numpy_dtype[t.dtype], t.dtype, t.shape, t.begin, t.end)))
    out.sort(key=operator.attrgetter("begin"))
    matched.append(True)
    return out


def entry_of(row: TensorRow, file_nbytes: int, where: str) -> HeaderEntry:
    """The read range of a manifest row (validated by the manifest: dtype allow-listed,
    range matching shape and dtype) for a reader that does not parse the file's header;
    the range must lie inside the file's ``file_nbytes``."""
    if row.end > file_nbytes:
        raise InvalidOffsetsError(f"{where}: tensor {row.key!r:.80} has an invalid byte range "
                                  f"(ends at {row.end}, the file has {file_nbytes} bytes)")
    dtype = safetensors_to_numpy(row.dtype)
    assert dtype is not None, "validated with the manifest"
    return HeaderEntry(row.key, dtype, row.dtype, row.shape, row.begin, row.end)


def read_tensors(
    f: BinaryIO, entries: Iterable[HeaderEntry], expected_crc: dict[str, int] | None,
    where: str, file_crc: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    """Read every tensor with ``readinto`` into fresh memory, checking crcs when given.

    ``entries`` come from :func:`read_header` (sorted, tiling the file), so their sizes are
    already bounded by the real file length. A tensor of ``_OWN`` bytes or more gets its
    own array; smaller tensors adjacent in the file are read with one ``readinto`` into
    one shared buffer and returned as views of it (one allocation and one call instead of
    one each: fewer page faults, less per-tensor overhead). Returns the arrays and the
    file checksum (see :func:`checkpointer.format.write_safetensors`) continued from ``file_crc`` over each tensor's
    crc32c (only computed when ``expected_crc`` is given).
    """
    out: dict[str, np.ndarray] = {}
    crcs: list[tuple[list[str], Callable[[], list[int]]]] = []
    for run in _runs(entries):
        start, end = run[0].begin, run[-1].end
        if len(run) == 1 and end - start >= _OWN:
            arr = allocate(run[0].shape, run[0].dtype, where, f"tensor {run[0].key!r:.80}")
            buf = raw_bytes(arr)
            out[run[0].key] = arr
        else:
            arena = allocate((end - start,), np.uint8, where, f"{len(run)} tensors from {run[0].key!r:.80}")
            buf = memoryview(arena)  # type: ignore[arg-type]
            view = np.ndarray  # one call per tensor (not a slice, a view and a reshape)
            for e in run:
                out[e.key] = view(e.shape, e.dtype, arena, e.begin - start)
        crcs += _read_run(f, run, buf, expected_crc is not None, where)
    chained = []
    for keys, result in crcs:
        for key, t_crc in zip(keys, result(), strict=True):
            if t_crc != expected_crc[key]:  # type: ignore[index]
                raise ChecksumMismatchError(f"{where}: tensor {key!r:.80} fails its crc32c checksum")
            chained.append(t_crc)
    if chained:  # the same chain as one crc32c call per tensor, in one call
        file_crc = crc32c(struct.pack(f"<{len(chained)}I", *chained), file_crc)
    return out, file_crc


def _runs(entries: Iterable[HeaderEntry]) -> Iterator[list[HeaderEntry]]:
    """Entries grouped for reading: a big tensor alone; adjacent small ones together, as
    long as each stays aligned to its item size within the group."""
    run: list[HeaderEntry] = []
    for e in entries:
        big = e.end - e.begin >= _OWN
        if run and (big or e.begin != run[-1].end or (e.begin - run[0].begin) % e.dtype.itemsize):
            yield run
            run = []
        if big:
            yield [e]
        else:
            run.append(e)
    if run:
        yield run


def _read_run(f: BinaryIO, run: list[HeaderEntry], buf: memoryview, verify: bool, where: str
              ) -> list[tuple[list[str], Callable[[], list[int]]]]:
    """Fill ``buf`` from the file range of ``run``; with ``verify``, each tensor's crc32c
    as ``(keys, their crcs)`` batches. In a buffer of ``_PIPELINE`` bytes or more the
    checksums run on the helper thread while the next chunk is read (both release the
    GIL): a big tensor's as one chain over its chunks, small ones in one task per chunk
    for the tensors that chunk completed."""
    start = run[0].begin
    f.seek(start)
    piped = verify and len(buf) >= _PIPELINE and _SPARE_CORE
    step = _READ_CHUNK if not piped else _PIPE_CHUNK if len(run) == 1 else _RUN_CHUNK
    chain: Future[int] | None = None
    batches: list[tuple[list[str], Callable[[], list[int]]]] = []
    got = done = 0  # bytes read; tensors whose checksum is under way
    while got < len(buf):
        n = f.readinto(buf[got:got + step])  # type: ignore[attr-defined]
        if not n:
            key = next(e.key for e in run if e.end > start + got)
            raise TruncatedFileError(f"{where}: tensor {key!r:.80} is cut short")
        if piped and len(run) == 1:
            chain = chain_crc(chain, buf[got:got + n])
        got += n
        if piped and len(run) > 1:
            k = done
            while k < len(run) and run[k].end - start <= got:
                k += 1
            if k > done:
                later = crcs_later([buf[e.begin - start:e.end - start] for e in run[done:k]])
                batches.append(([e.key for e in run[done:k]], later.result))
                done = k
    if not verify:
        return []
    if chain is not None:
        whole = chain
        return [([run[0].key], lambda: [whole.result()])]
    if not piped:
        views = [buf[e.begin - start:e.end - start] for e in run]
        return [([e.key for e in run], lambda: [crc32c(v) for v in views])]
    return batches


def read_rows(f: BinaryIO, where: str, e: HeaderEntry, rows: list[tuple[int, int, np.ndarray]],
               check: tuple[int, Sequence[int]] | int | None) -> None:
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
        for view in _cover_parts(c0, c1, dests, where):
            off = 0
            while off < len(view):
                # chunks never straddle a block, so each block's crc is one chain
                limit = min(len(view) - off, _CHUNK, size - pos % size if size else _CHUNK)
                k = f.readinto(view[off:off + limit])  # type: ignore[attr-defined]
                if not k:
                    raise TruncatedFileError(f"{where}: tensor {e.key!r:.80} is cut short")
                if check is not None:
                    chain = chain_crc(chain, view[off:off + k])
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



def _cover_parts(c0: int, c1: int, dests: list[tuple[int, int, memoryview]], where: str
                 ) -> list[memoryview]:
    """Where the bytes ``[c0, c1)`` of a tensor go, in order: the destinations' views, and
    scratch buffers for the bytes between or around them."""
    parts: list[memoryview] = []
    at = c0
    for a, b, view in dests:
        if b <= at or a >= c1:
            continue
        if a > at:
            parts.append(memoryview(allocate((a - at,), np.uint8, where, "bytes to verify")))  # type: ignore[arg-type]
            at = a
        parts.append(view[at - a:min(b, c1) - a])
        at = min(b, c1)
    if at < c1:
        parts.append(memoryview(allocate((c1 - at,), np.uint8, where, "bytes to verify")))  # type: ignore[arg-type]
    return parts


def verify_file(f: BinaryIO, entries: list[HeaderEntry], expected: Mapping[str, TensorRow],
                where: str, head_crc: int, block_bytes: int | None) -> int:
    """Check every checksum of one data file, reading it through two reused buffers; returns
    the file checksum (continued from ``head_crc``) for the caller to compare.

    Peak memory is two chunks whatever the file's size. A piece with block checksums is read
    block by block, each block checked, and its blocks must combine into its own checksum.
    """
    bufs = [np.empty(_CHUNK, dtype=np.uint8) for _ in range(2)]
    pending: list[Future[int] | None] = [None, None]  # the checksum still reading each buffer
    crcs: list[int] = []
    turn = 0
    for e in entries:
        row = expected[e.key]
        step = block_bytes if row.blocks and block_bytes else _CHUNK
        f.seek(e.begin)
        chain: Future[int] | None = None
        done: list[Future[int]] = []
        for start in range(e.begin, e.end, step):
            n = min(step, e.end - start)
            for lo in range(0, n, _CHUNK):
                if (busy := pending[turn]) is not None:
                    busy.result()  # its checksum has read it: the buffer may be reused
                view = memoryview(bufs[turn])[:min(_CHUNK, n - lo)]  # type: ignore[arg-type]
                _fill(f, view, where, e.key)
                chain = pending[turn] = chain_crc(chain, view)
                turn ^= 1
            if row.blocks:
                assert chain is not None
                done.append(chain)
                chain = None
        _check_tensor(row, chain, done, block_bytes, where)
        crcs.append(row.crc32c)
    return crc32c(struct.pack(f"<{len(crcs)}I", *crcs), head_crc) if crcs else head_crc


def _fill(f: BinaryIO, view: memoryview, where: str, key: str) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise TruncatedFileError(f"{where}: tensor {key!r:.80} is cut short")
        got += n


def _check_tensor(row: TensorRow, chain: Future[int] | None, blocks: list[Future[int]],
                  block_bytes: int | None, where: str) -> None:
    """The checksums read of one tensor against its manifest row."""
    if not row.blocks:
        if (0 if chain is None else chain.result()) != row.crc32c:
            raise ChecksumMismatchError(f"{where}: tensor {row.key!r:.80} fails its crc32c checksum")
        return
    assert block_bytes is not None
    for i, (got, want) in enumerate(zip(blocks, row.blocks, strict=True)):
        if got.result() != want:
            raise ChecksumMismatchError(f"{where}: tensor {row.key!r:.80} fails the crc32c "
                                        f"checksum of its block {i}")
    check_block_sum(row, block_bytes, where)


def check_block_sum(row: TensorRow, block_bytes: int, where: str) -> None:
    """A piece's block checksums must combine into its own checksum (no data needed)."""
    if crc_of_blocks(row.blocks, block_bytes, row.nbytes) != row.crc32c:
        raise ChecksumMismatchError(f"{where}: the block checksums of {row.key!r:.80} "
                                    "disagree with its checksum")
