"""Helpers of the hostile-input tests: bounded-memory calls, framing, a valid manifest."""

from __future__ import annotations

import gc
import io
import json
import struct
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

import checkpointer
from checkpointer import CheckpointError
from checkpointer import format as fmt
from checkpointer.checksum import crc32c
from checkpointer.frame import decode_framed
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME, read_manifest
from checkpointer.storage import open_store

MEMORY_CAP = 4 << 20  # bytes of Python allocation per case


@contextmanager
def bounded_memory() -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Yield ``run(fn)``: calls ``fn`` under tracemalloc and asserts its peak stayed small
    (tracing only the call keeps hypothesis's own generation fast)."""

    def traced(fn: Callable[[], Any]) -> tuple[Any, int]:
        tracemalloc.start()
        try:
            return fn(), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def run(fn: Callable[[], Any]) -> Any:
        result, peak = traced(fn)
        if peak >= MEMORY_CAP:
            # tracemalloc counts every thread, and a collection may run finalizers of earlier
            # tests' objects (an unclosed S3 file flushing its buffer) inside the window: run
            # the case again with no garbage pending. A loader that allocates without bound
            # on some input does it every time on that input.
            gc.collect()
            result, peak = traced(fn)
        assert peak < MEMORY_CAP, f"case allocated {peak} bytes"
        return result

    yield run


def only_checkpoint_errors(fn: Callable[[], Any]) -> str:
    """``fn()``'s outcome: 'ok' or the name of the CheckpointError it raised."""
    try:
        fn()
    except CheckpointError as exc:
        assert str(exc)
        return type(exc).__name__
    return "ok"


def _valid_file() -> bytes:
    buf = io.BytesIO()
    fmt.write_safetensors(
        buf,
        "data-00000.safetensors",
        [
            ("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
            ("b", np.zeros(3, np.int8)),
            ("c", np.ones((), np.float64)),
        ],
    )
    return buf.getvalue()


VALID = _valid_file()
HEADER_LEN = 8 + struct.unpack("<Q", VALID[:8])[0]


def parse_header(data: bytes) -> str:
    return only_checkpoint_errors(lambda: fmt.read_header(io.BytesIO(data), len(data), "fuzz"))


def framed_header(header: Any, tail: bytes, claim: int | None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if claim is None else claim) + blob + tail


def frame(body: bytes, magic: bytes = MANIFEST_MAGIC) -> bytes:
    return struct.pack("<8sIQ", magic, crc32c(body), len(body)) + body


def good_manifest() -> dict[str, Any]:
    store = open_store(f"memory://hostile-{uuid.uuid4().hex[:8]}")
    url = store.url_of("c")
    checkpointer.save(url, {"x": np.arange(4.0), "y": [1, "s", None, (b"b",)]})
    read_manifest(store, "c")  # valid, as written
    body: dict[str, Any] = decode_framed(store.read_bytes(f"c/{MANIFEST_NAME}"), MANIFEST_MAGIC, url)
    return body  # the raw body, for attacks to edit


GOOD = good_manifest()
