"""Checksum maths: crc32c, per-block checksums, combining them, and the checksum helper thread.

crc32c is hardware-accelerated (the ``crc32c`` package). A piece of a sharded array larger
than one block also carries the crc32c of each block, so a reader of part of it verifies
only the blocks it reads; a full read checks that the blocks combine into the piece's own
checksum (zlib's ``crc32_combine`` method over GF(2), no data needed). Large reads hand each
chunk's checksum to one helper thread while the next chunk is read (both release the GIL).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import crc32c as _crc

__all__ = ["crc32c", "block_crcs", "crc_of_blocks", "chain_crc", "crcs_later"]


def crc32c(data: Any, value: int = 0) -> int:
    """crc32c of ``data`` (any buffer), continuing from ``value``."""
    return int(_crc.crc32c(data, value))


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


def crcs_later(views: Sequence[memoryview]) -> Future[list[int]]:
    """The crc32c of each of ``views``, on the helper thread (one task for all of them)."""
    try:
        return _crc_pool().submit(lambda: [crc32c(v) for v in views])
    except RuntimeError:  # the interpreter is shutting down: no new work for threads
        done: Future[list[int]] = Future()
        done.set_result([crc32c(v) for v in views])
        return done


def chain_crc(prev: Future[int] | None, chunk: memoryview) -> Future[int]:
    """crc32c of ``chunk`` continued from ``prev``'s, on the helper thread (so that it runs
    while the caller reads the next chunk; both release the GIL)."""
    try:
        return _crc_pool().submit(_crc_after, prev, chunk)
    except RuntimeError:  # the interpreter is shutting down: no new work for threads
        done: Future[int] = Future()
        done.set_result(_crc_after(prev, chunk))
        return done
