"""Format v1: safetensors data files plus a checksummed msgpack manifest.

Writing streams each file: the header is computed from shapes and dtypes alone, then every
array's bytes go straight from its memory to the destination while crc32c runs once over
the same buffer (the file checksum is chained from the tensor checksums, see
:class:`FileRecord`). Reading is hostile-input safe: every size is capped and checked against the
real file length before anything is allocated, offsets must tile the data exactly, dtypes
are allow-listed, keys unique, names plain. See ``docs``-level description in README.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import threading
from collections.abc import Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, Protocol

import crc32c as _crc
import msgpack
import numpy as np

from .dtypes import numpy_to_safetensors, safetensors_to_numpy
from .errors import (
    ChecksumMismatchError,
    DuplicateKeyError,
    HeaderError,
    HeaderTooLargeError,
    InvalidOffsetsError,
    ManifestError,
    TrailingDataError,
    TruncatedFileError,
    UnsafePathError,
    UnsupportedDtypeError,
)

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "BLOCK_BYTES", "TensorRecord", "FileRecord", "crc32c", "block_crcs",
    "crc_of_blocks",
    "write_safetensors", "read_header", "read_tensors", "encode_framed", "decode_framed",
    "check_file_name",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.msgpack"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_NDIM = 64
BLOCK_BYTES = 4 << 20  # block of the per-block checksums of pieces (see TensorRecord.blocks)
_FRAME = struct.Struct("<8sIQ")  # magic, crc32c of body, body length
_SMALL = 1 << 16
_READ_CHUNK = 64 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")


def crc32c(data: Any, value: int = 0) -> int:
    """crc32c of ``data`` (any buffer), continuing from ``value``."""
    return int(_crc.crc32c(data, value))


class Sink(Protocol):
    def write(self, data: Any, /) -> Any: ...


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives: file, key, dtype (safetensors name), shape, byte range, crc."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    crc32c: int
    blocks: tuple[int, ...] = ()  # crc32c of each BLOCK_BYTES block (pieces of sharded arrays)


def block_crcs(data: memoryview, block_bytes: int) -> tuple[int, tuple[int, ...]]:
    """crc32c of the whole of ``data`` and of each of its ``block_bytes`` blocks (the last
    may be shorter), in one pass: the whole is combined from the blocks' crcs."""
    full = len(data) // block_bytes * block_bytes
    crcs = [crc32c(data[i:i + block_bytes]) for i in range(0, full, block_bytes)]
    shift = _zeros_operator(block_bytes) if crcs else ()
    whole = 0
    for c in crcs:  # crc(A || B) = crc(A) advanced over len(B) zero bytes, xor crc(B)
        whole = _gf2_times(shift, whole) ^ c
    if full < len(data):
        crcs.append(crc32c(data[full:]))
        whole = crc32c(data[full:], whole)
    return whole, tuple(crcs)


def crc_of_blocks(crcs: Sequence[int], block_bytes: int, nbytes: int) -> int:
    """The crc32c of ``nbytes`` bytes from the crc32c of each of their blocks (no data
    needed): how a full load checks a piece's block checksums against its own."""
    whole = 0
    for i, c in enumerate(crcs):
        length = min(block_bytes, nbytes - i * block_bytes)
        whole = _gf2_times(_zeros_operator(length), whole) ^ c if length > 0 else whole
    return whole


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=4)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The GF(2) matrix that advances a crc32c register over ``nbytes`` zero bytes (zlib's
    crc32_combine method: repeated squaring of the one-zero-bit operator)."""
    def square(m: Sequence[int]) -> list[int]:
        return [_gf2_times(m, row) for row in m]

    odd = [0x82F63B78] + [1 << n for n in range(31)]  # one zero bit (reflected polynomial)
    even = square(odd)  # two zero bits
    odd = square(even)  # four
    op: Sequence[int] | None = None
    n = nbytes
    while n:
        even = square(odd)  # one zero byte the first time, then 4, 16, ...
        if n & 1:
            op = even if op is None else [_gf2_times(even, row) for row in op]
        n >>= 1
        if not n:
            break
        odd = square(even)  # 2 zero bytes the first time, then 8, 32, ...
        if n & 1:
            op = odd if op is None else [_gf2_times(odd, row) for row in op]
        n >>= 1
    assert op is not None, "nbytes must be positive"
    return tuple(op)


@dataclass(frozen=True)
class FileRecord:
    """One data file: its name, total length and checksum.

    The file checksum is the crc32c of the header bytes (length prefix included)
    continued over every tensor's crc32c as little-endian uint32, in file order. Each
    tensor's bytes are covered by its own crc32c and offsets tile the file, so every
    byte of the file is covered while the data is checksummed in one pass.
    """

    name: str
    nbytes: int
    crc32c: int


def check_file_name(name: Any, where: str) -> str:
    """Refuse names that could escape a checkpoint folder."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UnsafePathError(f"{where}: file name {name!r:.80} is not a plain file name")
    return name


_CODES: dict[np.dtype, str | None] = {}


def _code(dtype: np.dtype) -> str | None:
    """``numpy_to_safetensors`` memoized (``dtype.name`` costs microseconds per call)."""
    try:
        return _CODES[dtype]
    except KeyError:
        code = _CODES[dtype] = numpy_to_safetensors(dtype)
        return code


def _le_contiguous(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def _raw(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def write_safetensors(
    sink: Sink, file_name: str, entries: Sequence[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None, *, blocked: Container[str] = (),
) -> tuple[FileRecord, list[TensorRecord]]:
    """Stream ``entries`` as one safetensors file into ``sink``; return its records.

    Tensors are laid out largest item size first so every tensor stays aligned for
    zero-copy readers. Only one tensor at a time is ever copied (when it is
    non-contiguous or big-endian). Tensors named in ``blocked`` and larger than
    :data:`BLOCK_BYTES` also get a crc32c per block, so that a reader can verify a byte
    range of them without reading the rest.
    """
    order = sorted(range(len(entries)), key=lambda i: -entries[i][1].dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    layout = []
    for i in order:
        key, arr = entries[i]
        code = _code(arr.dtype)
        if code is None:
            raise UnsupportedDtypeError(f"{key!r}: dtype {arr.dtype} is not supported")
        header[key] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        layout.append((key, arr, code, offset))
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    head = struct.pack("<Q", len(blob)) + blob
    sink.write(head)
    base = len(head)
    done: list[tuple[str, np.ndarray, str, int, int | memoryview, tuple[int, ...]]] = []
    for key, arr, code, off in layout:
        flat = _le_contiguous(arr)
        view = _raw(flat)
        sink.write(view)
        # a temporary copy is checksummed now; the caller's own memory later, while the
        # sink's fsync (started below, where the sink can) waits on the disk
        later = flat is arr and len(view) >= _SMALL
        c, blocks = (view, ()) if later else _checksums(view, key in blocked)
        done.append((key, arr, code, off, c, blocks))
    start_sync = getattr(sink, "start_sync", None)
    if start_sync is not None:
        start_sync()
    tensors = []
    for key, arr, code, off, c, blocks in done:
        if not isinstance(c, int):
            c, blocks = _checksums(c, key in blocked)
        tensors.append(TensorRecord(key, file_name, code, tuple(arr.shape), base + off,
                                    base + off + arr.nbytes, c, blocks))
    crcs = struct.pack(f"<{len(tensors)}I", *(t.crc32c for t in tensors))
    return FileRecord(file_name, base + offset, crc32c(crcs, crc32c(head))), tensors


def _checksums(view: memoryview, blocked: bool) -> tuple[int, tuple[int, ...]]:
    """A tensor's crc32c, and its blocks' when it is a piece larger than one block."""
    if blocked and len(view) > BLOCK_BYTES:
        return block_crcs(view, BLOCK_BYTES)
    return crc32c(view), ()


class HeaderEntry(NamedTuple):
    """One tensor of a parsed header (a NamedTuple: thousands are built per file)."""

    key: str
    dtype: np.dtype
    code: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def _pairs_no_dupes(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)  # in C; only a lost key means a duplicate worth looking for
        if len(out) != len(pairs):
            seen: set[str] = set()
            for k, _ in pairs:
                if k in seen:
                    raise DuplicateKeyError(f"{where}: key {k!r:.80} appears twice in the header")
                seen.add(k)
        return out
    return hook


def _read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    data: bytes = f.read(n)
    if len(data) != n:
        raise TruncatedFileError(f"{where}: file ends after {len(data)} of {n} bytes")
    return data


def read_header(f: BinaryIO, file_size: int, where: str) -> tuple[list[HeaderEntry], int]:
    """Parse and validate the safetensors header of ``f`` (positioned at 0).

    Returns the entries sorted by offset and the crc32c of the header bytes (length
    prefix included), from which :func:`read_tensors` continues the file checksum.

    Raises the specific :class:`HeaderError` / :class:`TruncatedFileError` /
    :class:`TrailingDataError` for each rule broken.
    """
    if file_size < 8:
        raise TruncatedFileError(f"{where}: {file_size} bytes, too short for a header")
    prefix = _read_exact(f, 8, where)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise HeaderTooLargeError(f"{where}: header claims {n} bytes (cap {MAX_HEADER_BYTES})")
    if n > file_size - 8:
        raise TruncatedFileError(f"{where}: header claims {n} bytes, file has {file_size - 8}")
    raw = _read_exact(f, n, where)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs_no_dupes(where))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, int digit limit
        raise HeaderError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{where}: header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    entries = [_header_entry(k, v, base, where) for k, v in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = base
    for e in entries:
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else "leaves a gap"
            raise InvalidOffsetsError(f"{where}: tensor {e.key!r:.80} {what} (offset {e.begin - base})")
        pos = e.end
    if pos > file_size:
        raise TruncatedFileError(f"{where}: data ends at byte {pos}, file has {file_size}")
    if pos < file_size:
        raise TrailingDataError(f"{where}: {file_size - pos} bytes after the last tensor")
    return entries, crc32c(raw, crc32c(prefix))


_LIMIT = 1 << 62
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


def _small_ints(xs: Any) -> bool:
    """A list of ints in [0, 2**62): the only shapes and offsets a header may hold."""
    if type(xs) is not list:
        return False
    for x in xs:
        if type(x) is not int or not 0 <= x < _LIMIT:
            return False
    return True


def _header_entry(key: str, info: Any, base: int, where: str) -> HeaderEntry:
    if type(info) is not dict or info.keys() != _ENTRY_KEYS:
        raise HeaderError(f"{where}: tensor {key!r:.80} entry is malformed")
    code = info["dtype"]
    dtype = safetensors_to_numpy(code)
    if dtype is None:
        raise UnsupportedDtypeError(f"{where}: tensor {key!r:.80} has dtype {code!r:.20}")
    shape, offs = info["shape"], info["data_offsets"]
    if not _small_ints(shape) or len(shape) > MAX_NDIM:
        raise HeaderError(f"{where}: tensor {key!r:.80} has an invalid shape {shape!r:.80}")
    if not _small_ints(offs) or len(offs) != 2 or offs[0] > offs[1]:
        raise InvalidOffsetsError(f"{where}: tensor {key!r:.80} has invalid offsets {offs!r:.80}")
    size = math.prod(shape)
    if not size and math.prod(d for d in shape if d) * dtype.itemsize >= _LIMIT:
        raise HeaderError(f"{where}: tensor {key!r:.80} has an impossible shape {shape!r:.80}")
    if size * dtype.itemsize != offs[1] - offs[0]:
        raise InvalidOffsetsError(
            f"{where}: tensor {key!r:.80} spans {offs[1] - offs[0]} bytes but its shape and "
            f"dtype need {size * dtype.itemsize}")
    return HeaderEntry(key, dtype, code, tuple(shape), base + offs[0], base + offs[1])


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
    file checksum (see :class:`FileRecord`) continued from ``file_crc`` over each tensor's
    crc32c (only computed when ``expected_crc`` is given).
    """
    out: dict[str, np.ndarray] = {}
    crcs: list[tuple[str, int | Future[int]]] = []
    for run in _runs(entries):
        start, end = run[0].begin, run[-1].end
        if len(run) == 1 and end - start >= _OWN:
            arr = np.empty(run[0].shape, dtype=run[0].dtype)
            buf = _raw(arr)
            out[run[0].key] = arr
        else:
            arena = np.empty(end - start, dtype=np.uint8)
            buf = memoryview(arena)  # type: ignore[arg-type]
            for e in run:
                out[e.key] = arena[e.begin - start:e.end - start].view(e.dtype).reshape(e.shape)
        # a big tensor is checksummed chunk by chunk on a helper thread while the next
        # chunk is read (both release the GIL), so verification hides behind the reads
        piped = expected_crc is not None and len(run) == 1 and len(buf) >= _PIPELINE
        chain = _read_run(f, run, buf, piped, where)
        if chain is not None:
            crcs.append((run[0].key, chain))
        elif expected_crc is not None:
            crcs += [(e.key, crc32c(buf[e.begin - start:e.end - start])) for e in run]
    chained = []
    for key, c in crcs:
        t_crc = c if isinstance(c, int) else c.result()
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


def _read_run(f: BinaryIO, run: list[HeaderEntry], buf: memoryview, piped: bool,
              where: str) -> Future[int] | None:
    """Fill ``buf`` from the file range of ``run``; the crc32c chain when ``piped``."""
    f.seek(run[0].begin)
    step = _PIPE_CHUNK if piped else _READ_CHUNK
    chain: Future[int] | None = None
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:got + step])  # type: ignore[attr-defined]
        if not n:
            key = next(e.key for e in run if e.end > run[0].begin + got)
            raise TruncatedFileError(f"{where}: tensor {key!r:.80} is cut short")
        if piped:
            chain = chain_crc(chain, buf[got:got + n])
        got += n
    return chain


_OWN = 4 << 20
_PIPELINE = 16 << 20
_PIPE_CHUNK = 8 << 20
_pool: list[ThreadPoolExecutor] = []
_pool_lock = threading.Lock()


def _crc_pool() -> ThreadPoolExecutor:
    """One shared helper thread; its FIFO order keeps each chunk chain sequential."""
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpointer-crc"))
        return _pool[0]


if hasattr(os, "register_at_fork"):  # a forked child has no helper thread: start a new one
    os.register_at_fork(after_in_child=_pool.clear)


def _crc_after(prev: Future[int] | None, chunk: memoryview) -> int:
    return crc32c(chunk, 0 if prev is None else prev.result())


def chain_crc(prev: Future[int] | None, chunk: memoryview) -> Future[int]:
    """crc32c of ``chunk`` continued from ``prev``'s, on the helper thread (so that it runs
    while the caller reads the next chunk; both release the GIL)."""
    try:
        return _crc_pool().submit(_crc_after, prev, chunk)
    except RuntimeError:  # the interpreter is shutting down: no new work for threads
        done: Future[int] = Future()
        done.set_result(_crc_after(prev, chunk))
        return done


def encode_framed(magic: bytes, obj: Any) -> bytes:
    """msgpack ``obj`` behind a frame of magic, crc32c and length."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _FRAME.pack(magic, crc32c(body), len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ManifestError(f"msgpack extension type {code} is not allowed")


def decode_framed(data: bytes, magic: bytes, where: str, cap: int = MAX_MANIFEST_BYTES) -> Any:
    """Check the frame and checksum of ``data`` and decode its msgpack body safely."""
    if len(data) < _FRAME.size:
        raise ManifestError(f"{where}: {len(data)} bytes, too short to be a manifest")
    got_magic, crc, length = _FRAME.unpack_from(data)
    if got_magic != magic:
        raise ManifestError(f"{where}: not a checkpointer file (bad magic {got_magic!r})")
    if length > cap:
        raise ManifestError(f"{where}: body claims {length} bytes (cap {cap})")
    body = data[_FRAME.size:]
    if len(body) < length:
        raise TruncatedFileError(f"{where}: body is {len(body)} of {length} bytes")
    if len(body) > length:
        raise TrailingDataError(f"{where}: {len(body) - length} bytes after the body")
    if crc32c(body) != crc:
        raise ChecksumMismatchError(f"{where}: checksum does not match its content")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                               use_list=True)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ManifestError(f"{where}: undecodable msgpack ({exc})") from None
