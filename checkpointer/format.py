"""Format v1 layout: how one safetensors data file is written and how its header is read.

Writing streams each file: the header is computed from shapes and dtypes alone, then every
array's bytes go straight from its memory to the destination while crc32c runs once over
the same buffer (the file checksum is chained from the tensor checksums, see
:func:`write_safetensors`). Reading a header is hostile-input safe: every size is capped and
checked against the real file length before anything is allocated, the objects the JSON
would become must fit :func:`header_budget` before it is parsed (:func:`header_memory`),
offsets must tile the data exactly, dtypes are allow-listed, keys unique. The manifest
beside the data files is :mod:`checkpointer.manifest`'s; reading tensor bytes is
:mod:`checkpointer.reading`'s.

The header's memory rule mirrors the manifest's (:mod:`checkpointer.frame`): at most
``HEADER_MEMORY_PER_BYTE`` (48) bytes of objects per byte of JSON, plus 64 MiB. A JSON
byte can become 24 to 36 bytes of objects (``{},`` is a 64-byte dict, ``"ab":{},`` a key,
a dict and their entries), so a 32 MiB header of empty objects took 1 GiB before this
rule. The estimate counts the characters that open containers and end values and keys,
each charged the most its object can take (those inside strings too: a key made of
brackets counts as structure): a header as the engine writes it is estimated at 25 to 41
bytes per byte (7 to 11 really, measured with tracemalloc), in about 1 ms per MiB.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Container, Sequence
from typing import Any, BinaryIO, NamedTuple, Protocol, TypeAlias

import numpy as np

from .checksum import block_crcs, crc32c
from .dtypes import numpy_to_safetensors, safetensors_to_numpy
from .errors import (
    DuplicateKeyError,
    HeaderError,
    HeaderTooLargeError,
    InsufficientMemoryError,
    InvalidOffsetsError,
    TrailingDataError,
    TruncatedFileError,
    UnsupportedDtypeError,
)
from .frame import MEMORY_FLOOR
from .manifest import MAX_NDIM, FileRow, TensorRow

__all__ = ["BLOCK_BYTES", "MAX_HEADER_BYTES", "HEADER_MEMORY_PER_BYTE", "HeaderEntry", "write_safetensors",
           "read_header", "header_memory", "header_budget", "raw_bytes", "read_exact"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_MEMORY_PER_BYTE = 48
BLOCK_BYTES = 4 << 20  # block of the per-block checksums of pieces (see TensorRow.blocks)
_SMALL = 1 << 16


class Sink(Protocol):
    def write(self, data: Any, /) -> Any: ...


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


def raw_bytes(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def write_safetensors(
    sink: Sink, file_name: str, entries: Sequence[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None, *, blocked: Container[str] = (),
) -> tuple[FileRow, list[TensorRow]]:
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
        view = raw_bytes(flat)
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
        tensors.append(TensorRow(key, file_name, code, tuple(arr.shape), base + off,
                                    base + off + arr.nbytes, c, blocks))
    crcs = struct.pack(f"<{len(tensors)}I", *(t.crc32c for t in tensors))
    # The file checksum is the crc32c of the header bytes (length prefix included) continued
    # over every tensor's crc32c as little-endian uint32, in file order: tensors' bytes are
    # covered by their own crc32c and offsets tile the file, so every byte is covered while
    # the data is checksummed in one pass.
    return FileRow(file_name, base + offset, crc32c(crcs, crc32c(head))), tensors


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


def read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    data: bytes = f.read(n)
    if len(data) != n:
        raise TruncatedFileError(f"{where}: file ends after {len(data)} of {n} bytes")
    return data


def header_budget(nbytes: int) -> int:
    """The most memory the parsed objects of a header of ``nbytes`` bytes may take."""
    return HEADER_MEMORY_PER_BYTE * nbytes + MEMORY_FLOOR


# What each structural JSON character stands for, from above (CPython 3.10+, 64-bit):
# "{" a dict (192) and the list of its pairs while it is parsed (112); "[" a list and its
# growth (112); ":" a key: the pair (64), its slot (16), the dict's entry (40), json's memo
# of keys (48), the set that looks for a duplicate (32); "," "]" "}" the end of a value: an
# int (48 at most) or float, and its slot (16); '"' half of an str (112 each, characters apart).
_JSON_COST = np.zeros(256, dtype=np.int64)
for _ch, _cost in (("{", 304), ("[", 112), (":", 200), (",", 64), ("]", 64), ("}", 64), ('"', 56)):
    _JSON_COST[ord(_ch)] = _cost
_CHUNK = 1 << 16


def _json_structure(raw: bytes) -> int:
    data = np.frombuffer(raw, dtype=np.uint8)
    return sum(int(np.bincount(data[i:i + _CHUNK], minlength=256) @ _JSON_COST)  # small temporaries
               for i in range(0, len(data), _CHUNK))


def header_memory(raw: bytes) -> int:
    """An upper bound of the memory that parsing the JSON ``raw`` takes: the decoded text,
    then its objects, estimated from the structural characters (also those inside keys:
    a header whose keys are made of brackets is estimated as if they were structure)."""
    wide = not raw.isascii() or b"\\" in raw  # then an str may take 4 bytes per character
    text = (80 + 4 * len(raw)) if wide else 49 + len(raw)
    return 64 + text + (4 if wide else 1) * len(raw) + _json_structure(raw)  # slot, text, strs' characters


def _parse_json(raw: bytes, where: str, plain: bool = False) -> Any:
    """``plain``: without the duplicate-key hook (faster; the caller rules duplicates out)."""
    if (need := header_memory(raw)) > header_budget(len(raw)):
        raise HeaderError(f"{where}: its {len(raw)}-byte header would parse to over {need} bytes of "
                          f"objects, more than the {HEADER_MEMORY_PER_BYTE} bytes per byte "
                          f"(+{MEMORY_FLOOR >> 20} MiB) any real header takes")
    try:
        text = raw.decode("utf-8")
        return json.loads(text) if plain else json.loads(text, object_pairs_hook=_pairs_no_dupes(where))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, int digit limit
        raise HeaderError(f"{where}: header is not valid JSON ({exc})") from None


Match: TypeAlias = Callable[[dict[str, Any], int], "list[HeaderEntry] | None"]
"""``match(header, base)``: the entries, when the parsed ``header`` (``__metadata__`` popped)
is exactly what the caller expects (offsets relative to ``base``); ``None`` otherwise."""


def read_header(f: BinaryIO, file_size: int, where: str, match: Match | None = None
                ) -> tuple[list[HeaderEntry], int]:
    """Parse and validate the safetensors header of ``f`` (positioned at 0).

    Returns the entries sorted by offset and the crc32c of the header bytes (length
    prefix included), from which :func:`checkpointer.reading.read_tensors` continues the file checksum.
    ``match`` (see :data:`Match`) may vouch for every entry at once (a reader that knows them
    from a validated manifest): then they are not validated one by one, which costs most of
    a header's reading when it lists thousands of tensors.

    Raises the specific :class:`HeaderError` / :class:`TruncatedFileError` /
    :class:`TrailingDataError` for each rule broken, and :class:`CheckpointError` when
    the memory for a header within its budget ran out.
    """
    if file_size < 8:
        raise TruncatedFileError(f"{where}: {file_size} bytes, too short for a header")
    prefix = read_exact(f, 8, where)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise HeaderTooLargeError(f"{where}: header claims {n} bytes (cap {MAX_HEADER_BYTES})")
    if n > file_size - 8:
        raise TruncatedFileError(f"{where}: header claims {n} bytes, file has {file_size - 8}")
    try:
        raw = read_exact(f, n, where)
        base = 8 + n
        entries = None if match is None else _matched(raw, base, where, match)
        if entries is None:
            header = _parse_json(raw, where)
            if not isinstance(header, dict):
                raise HeaderError(f"{where}: header is not a JSON object")
            header.pop("__metadata__", None)
            entries = [_header_entry(k, v, base, where) for k, v in header.items()]
            entries.sort(key=lambda e: (e.begin, e.end))
    except MemoryError:
        raise InsufficientMemoryError(f"{where}: not enough memory to parse its {n}-byte header") from None
    _check_tiling(entries, base, file_size, where)
    return entries, crc32c(raw, crc32c(prefix))


def _matched(raw: bytes, base: int, where: str, match: Match) -> list[HeaderEntry] | None:
    """The entries ``match`` vouches for, from a parse without the duplicate-key hook, when
    the header provably holds no duplicate key: its ``:`` count is exactly its pairs' (a
    duplicate adds a pair; a ``:`` inside a string only adds to the count, which then sends
    the header to the full parse, as does anything else unusual). ``None``: the full parse
    decides, and raises the error that names what is wrong."""
    header = _parse_json(raw, where, plain=True)
    if type(header) is not dict:
        return None
    had_meta = "__metadata__" in header
    meta = header.pop("__metadata__", {})
    if type(meta) is not dict or any(type(v) is not str for v in meta.values()):
        return None
    if raw.count(b":") != had_meta + len(meta) + 4 * len(header):  # entry key + its 3 fields
        return None
    return match(header, base)


def _check_tiling(entries: list[HeaderEntry], base: int, file_size: int, where: str) -> None:
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
