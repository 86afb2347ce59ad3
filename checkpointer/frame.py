"""A framed msgpack document: 8-byte magic, crc32c of the body, body length, then the body.

The manifest and the index are framed documents. Decoding is hostile-input safe: the frame
is checked (magic, declared length against the cap and the real length, checksum) before
the body is decoded, and msgpack extension types are refused.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .checksum import crc32c
from .errors import ChecksumMismatchError, ManifestError, TrailingDataError, TruncatedFileError

__all__ = ["encode_framed", "decode_framed", "refuse_timestamps", "FRAME_BYTES", "MAX_BODY_BYTES"]

_FRAME = struct.Struct("<8sIQ")  # magic, crc32c of body, body length
FRAME_BYTES = _FRAME.size
MAX_BODY_BYTES = 256 * 1024 * 1024


def encode_framed(magic: bytes, obj: Any) -> bytes:
    """msgpack ``obj`` behind a frame of magic, crc32c and length."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _FRAME.pack(magic, crc32c(body), len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ManifestError(f"msgpack extension type {code} is not allowed")


def decode_framed(data: bytes, magic: bytes, where: str, cap: int = MAX_BODY_BYTES) -> Any:
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
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_ext,
                              use_list=True)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
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
