"""A framed msgpack document: 8-byte magic, crc32c of the body, body length, then the body.

The manifest and the index are framed documents. Decoding is hostile-input safe: the frame
is checked (magic, declared length against the cap and the real length, checksum) before
the body is decoded, msgpack extension types are refused, and the memory the decoded
objects may take is bounded by the body's size before any of them is built.

The memory rule: a body of ``n`` bytes is decoded only if its objects take at most
:func:`memory_budget` ``(n) = MEMORY_PER_BYTE * n + MEMORY_FLOOR`` bytes (32 per byte, plus
64 MiB that any document may take). One byte of msgpack can become an object of 64 to 300
bytes (an empty map is one byte and a 64-byte dict), so before this rule a 32 MiB body of
empty maps took 2.4 GiB, and the 256 MiB cap allowed 18 GiB. What real documents take,
measured with tracemalloc: a manifest of 10,000 tensors 10 bytes per byte, 5 with long
names; tree skeletons of Python scalars 15 to 25 (a list of Nones 25); a state made of
empty lists or of nested one-item lists 35, the densest the engine writes. Over the floor,
documents denser than 32 bytes per byte are refused (such a state, beyond two million
empty lists, is one to store differently).

:func:`memory_needed` checks the rule without building anything, in two steps:

- an upper bound from the byte histogram, each byte charged the most that an object
  starting with that byte can take (string and integer payloads charged as if they were
  object headers too): about 1 ms per MiB; 18 to 41 bytes per byte for real manifests
  (those over 32 pass it up to about 7 MiB, 70,000 tensors, thanks to the floor);
- when that bound is over the budget, the tokens are walked, each charged what CPython
  allocates for it (:func:`decoded_bytes`): 10 to 60 % above the real size, 20 to 250 ms
  per MiB (runs of one-byte tokens, such as floods of empty maps, at C speed), stopping as
  soon as the budget is passed.

Object sizes are CPython's (3.10 and later, 64-bit), rounded up to the 16-byte blocks of
its small-object allocator, with malloc's overhead above 512 bytes. msgpack's own limits
(``max_*_len``) are set from the body's length as well: an item takes one byte at least.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

from .checksum import crc32c
from .errors import (
    ChecksumMismatchError,
    InsufficientMemoryError,
    ManifestError,
    TrailingDataError,
    TruncatedFileError,
)

__all__ = ["encode_framed", "decode_framed", "refuse_timestamps", "memory_budget", "memory_needed",
           "decoded_bytes", "FRAME_BYTES", "MAX_BODY_BYTES", "MEMORY_PER_BYTE", "MEMORY_FLOOR"]

_FRAME = struct.Struct("<8sIQ")  # magic, crc32c of body, body length
FRAME_BYTES = _FRAME.size
MAX_BODY_BYTES = 256 * 1024 * 1024
MEMORY_PER_BYTE = 32
MEMORY_FLOOR = 64 << 20


def memory_budget(nbytes: int) -> int:
    """The most memory the decoded objects of a body of ``nbytes`` bytes may take."""
    return MEMORY_PER_BYTE * nbytes + MEMORY_FLOOR


# -- what CPython allocates per msgpack token (see the module docstring) -------------------

def _block(n: int) -> int:
    return ((n + 15) & ~15) + (16 if n > 512 else 0)


def _list(n: int) -> int:
    return 64 + (_block(8 * n) if n else 0)  # the list, and its n slots


def _dict(n: int) -> int:
    # msgpack inserts one by one (a table grows to <= 38 bytes per entry) and interns each
    # str key (an entry in the interpreter's table of interned strings)
    return 64 if n == 0 else 192 + 80 * n


def _str(nbytes: int) -> int:
    """An str of ``nbytes`` bytes of UTF-8 (as if not ASCII: up to 4 bytes a character);
    the empty and one-character ones are shared."""
    return 0 if nbytes < 2 else _block(80 + 4 * nbytes)


# Tokens whose first byte gives their length: that length, and what the token costs (0 for
# the other tokens). Cached objects cost nothing: None, booleans, ints in [-5, 256], strs of
# up to one character; every object's reference is counted in its container (a list's
# slots, a dict's table). Ints beyond the cache take 32 bytes (48 beyond 2**60), floats 32,
# a timestamp (the one ext msgpack decodes itself) 128.
_STEP, _COST = [0] * 256, [0] * 256
_TOKENS = [(b, 1, 0) for b in range(0x80)] + [(0x80 + n, 1, _dict(n)) for n in range(16)]
_TOKENS += [(0x90 + n, 1, _list(n)) for n in range(16)] + [(0xA0 + n, 1 + n, _str(n)) for n in range(32)]
_TOKENS += [(0xC0, 1, 0), (0xC1, 1, 0), (0xC2, 1, 0), (0xC3, 1, 0)]  # nil, (never used), false, true
_TOKENS += [(b, 1, 32 if b - 256 < -5 else 0) for b in range(0xE0, 0x100)]  # negative fixint
_TOKENS += [(0xCA, 5, 32), (0xCB, 9, 32), (0xCC, 2, 0), (0xCD, 3, 32), (0xCE, 5, 32), (0xCF, 9, 48),
            (0xD0, 2, 32), (0xD1, 3, 32), (0xD2, 5, 32), (0xD3, 9, 48), (0xD4, 3, 128), (0xD5, 4, 128),
            (0xD6, 6, 128), (0xD7, 10, 128), (0xD8, 18, 128)]
for _b, _step, _cost in _TOKENS:
    _STEP[_b], _COST[_b] = _step, _cost
_LONGER = bytes(int(k != 1) for k in _STEP)  # bytes.translate table: 0 for one-byte tokens
_UNIT_COST = np.array([c if k == 1 else 0 for k, c in zip(_STEP, _COST, strict=True)], dtype=np.int64)
# Tokens with a length after their first byte: (bytes of the length, kind).
_SIZED = {0xC4: (1, "bin"), 0xC5: (2, "bin"), 0xC6: (4, "bin"), 0xC7: (1, "ext"), 0xC8: (2, "ext"),
          0xC9: (4, "ext"), 0xD9: (1, "str"), 0xDA: (2, "str"), 0xDB: (4, "str"), 0xDC: (2, "list"),
          0xDD: (4, "list"), 0xDE: (2, "dict"), 0xDF: (4, "dict")}

# The histogram bound: the most an object starting with each byte takes, its reference (8)
# and, for a possible map key (str, bin), its share of the map's table (80) included. A
# list's slots are charged to its items (8 each) and a dict's table to its keys, since the
# counts after array16/map16 bytes are unknown here; string contents are covered by the
# charge of their own bytes (8 at least; a character takes 4 at most).
_MOST = np.array([8 + c for c in _COST], dtype=np.int64)
_MOST[0x81:0x90] = 8 + 192 + 16
_MOST[0x91:0xA0] = 8 + 64 + 16
_MOST[0xA0:0xC0] = 8 + 80 + 96
for _b, (_n, _kind) in _SIZED.items():
    _MOST[_b] = 8 + {"bin": 80 + 64, "ext": 128, "str": 80 + 96, "list": 64 + 24, "dict": 192 + 16}[_kind]
_LONG_RUN = 4096
_CHUNK = 1 << 16


def _histogram(data: bytes | memoryview, costs: np.ndarray) -> int:
    """The sum of ``costs[b]`` over the bytes ``b`` of ``data`` (in chunks: small temporaries)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return sum(int(np.bincount(arr[i:i + _CHUNK], minlength=256) @ costs) for i in range(0, len(arr), _CHUNK))


def decoded_bytes(body: bytes, limit: int = 1 << 62, start: int = 0) -> int:
    """An upper bound of the memory that ``msgpack.unpackb(body[start:])`` allocates, from
    the tokens (nothing is built); the walk stops once the total passes ``limit``."""
    longer = body.translate(_LONGER)  # runs of one-byte tokens are found, and summed, at C speed
    n, pos, total = len(body), start, 0
    step, cost = _STEP, _COST
    while pos < n and total <= limit:
        b = body[pos]
        if k := step[b]:
            total += cost[b]
            pos += k
            if k == 1 and pos < n and not longer[pos]:  # a run of one-byte tokens
                end = longer.find(1, pos)
                end = n if end < 0 else end
                if end - pos >= _LONG_RUN:
                    total += _histogram(memoryview(body)[pos:end], _UNIT_COST)
                else:
                    total += sum(map(cost.__getitem__, body[pos:end]))
                pos = end
            continue
        width, kind = _SIZED[b]
        m = int.from_bytes(body[pos + 1:pos + 1 + width], "big")
        pos += 1 + width
        if kind == "list":
            total += _list(m)
        elif kind == "dict":
            total += _dict(m)
        else:  # bytes follow: an str's, a bin's, or an ext's type and data
            total += _str(m) if kind == "str" else 128 if kind == "ext" else _block(33 + m) if m > 1 else 0
            pos += m + (kind == "ext")
    return total


def memory_needed(body: bytes, budget: int, start: int = 0) -> int:
    """An upper bound of the memory decoding ``body[start:]`` takes: the histogram bound
    when it is within ``budget``, else the token walk's (which stops once past ``budget``)."""
    most = _histogram(memoryview(body)[start:], _MOST)
    return most if most <= budget else decoded_bytes(body, budget, start)


def encode_framed(magic: bytes, obj: Any) -> bytes:
    """msgpack ``obj`` behind a frame of magic, crc32c and length."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _FRAME.pack(magic, crc32c(body), len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ManifestError(f"msgpack extension type {code} is not allowed")


def decode_framed(data: bytes, magic: bytes, where: str, cap: int = MAX_BODY_BYTES) -> Any:
    """Check the frame and checksum of ``data`` and decode its msgpack body safely.

    Raises:
        ManifestError: (or another CorruptCheckpointError) the frame or the body is bad,
            or the body would decode to more than :func:`memory_budget` bytes.
        CheckpointError: the memory for a body within the budget ran out.
    """
    if len(data) < _FRAME.size:
        raise ManifestError(f"{where}: {len(data)} bytes, too short to be a manifest")
    got_magic, crc, length = _FRAME.unpack_from(data)
    if got_magic != magic:
        raise ManifestError(f"{where}: not a checkpointer file (bad magic {got_magic!r})")
    if length > cap:
        raise ManifestError(f"{where}: body claims {length} bytes (cap {cap})")
    body = memoryview(data)[_FRAME.size:]
    if len(body) < length:
        raise TruncatedFileError(f"{where}: body is {len(body)} of {length} bytes")
    if len(body) > length:
        raise TrailingDataError(f"{where}: {len(body) - length} bytes after the body")
    if crc32c(body) != crc:
        raise ChecksumMismatchError(f"{where}: checksum does not match its content")
    budget = memory_budget(length)
    if (need := memory_needed(data, budget, _FRAME.size)) > budget:
        raise ManifestError(f"{where}: its {length} bytes would decode to over {need} bytes of objects, "
                            f"more than the {MEMORY_PER_BYTE} bytes per byte (+{MEMORY_FLOOR >> 20} MiB) "
                            "any real document takes")
    try:  # every length is bounded by the body's (one byte at least per item)
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True,
                              max_str_len=length, max_bin_len=length, max_array_len=length,
                              max_map_len=length // 2, max_ext_len=length)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    except MemoryError:
        raise InsufficientMemoryError(f"{where}: not enough memory to decode its {length} bytes") from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ManifestError(f"{where}: undecodable msgpack ({exc})") from None
    return obj


def refuse_timestamps(obj: Any, where: str) -> None:
    """Refuse msgpack's timestamp extension (type -1) anywhere in ``obj``: msgpack decodes it
    itself, without calling the ``ext_hook`` that refuses every other extension.

    Call it on the free-form parts of a document (fields whose types nothing else checks);
    typed parts refuse a timestamp anyway, as a value of the wrong type.
    """
    if _holds_timestamp(obj):
        raise ManifestError(f"{where}: msgpack extension type -1 (timestamp) is not allowed")


def _holds_timestamp(obj: Any) -> bool:
    stack = [obj]
    while stack:
        node = stack.pop()
        if isinstance(node, msgpack.Timestamp):
            return True
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
    return False
