"""Writing one object to S3 (s3fs) the way ``s3fs.pipe_file`` does, while streaming.

A data file's size is known before it is written (its tensors' bytes, plus a header), so
:func:`open_object` picks what ``pipe_file`` would for that many bytes:

- below :data:`SINGLE_PUT_BYTES` one ``PUT`` whose body is the buffer the writes filled
  (:class:`SinglePut`; s3fs's own file copies its buffer out once more before the ``PUT``);
- above it a multipart upload whose parts go :data:`IN_FLIGHT` at a time on s3fs's event
  loop while the writer fills the next one (:class:`ParallelUpload`), so the upload runs at
  the store's parallel speed rather than one part after another. Memory: at most
  ``IN_FLIGHT + 1`` parts of :data:`PART_BYTES`.

Anything else (no size, another fsspec filesystem) gets the filesystem's own file. The
object appears only when the upload completes: an interrupted upload is aborted, or, when
the process died, left for :func:`checkpointer.commit.cleanup` to abort (its key carries
the writer's owner token).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from concurrent.futures import Future
from typing import Any

from fsspec.asyn import sync

__all__ = ["open_object", "SinglePut", "ParallelUpload", "SINGLE_PUT_BYTES", "PART_BYTES", "IN_FLIGHT"]

SINGLE_PUT_BYTES = 100 << 20  # s3fs pipe_file: one put below 2 x its 50 MiB chunks
PART_BYTES = 16 << 20
IN_FLIGHT = 4
_HEADER_ROOM = 16 << 20  # a header's bytes beyond the tensors' (a cap, not an estimate)


def open_object(fs: Any, path: str, size_hint: int | None) -> Any:
    """A binary writer for object ``path`` of about ``size_hint`` bytes (see the module)."""
    parallel = callable(getattr(fs, "_call_s3", None)) and getattr(fs, "loop", None) is not None
    if size_hint is not None and parallel and size_hint >= SINGLE_PUT_BYTES:
        return ParallelUpload(fs, path)
    if size_hint is not None and parallel and size_hint + _HEADER_ROOM < SINGLE_PUT_BYTES:
        return SinglePut(fs, path)
    if size_hint is not None and size_hint + _HEADER_ROOM < SINGLE_PUT_BYTES:
        # one buffer for the whole object: closed, it is a single PUT (a multipart upload
        # costs three requests more and, on some servers, a copy of every part)
        return fs.open(path, "wb", block_size=max(5 << 20, size_hint + _HEADER_ROOM))
    return fs.open(path, "wb")


class SinglePut:
    """One object sent with one ``PUT`` at :meth:`close`; :meth:`discard` sends nothing.

    The writes fill one ``BytesIO``, which is the request's body as it is: botocore turns a
    ``bytes`` body into a ``BytesIO`` and aiohttp then takes a copy of its buffer, and a
    ``bytearray`` body is copied twice into the socket's buffer (measured at 64 MiB: a
    fresh copy of that size costs about 60 ms here, of a 600 ms ``PUT``).
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self._body: io.BytesIO | None = io.BytesIO()

    def write(self, data: Any) -> int:
        if self._body is None:
            raise ValueError(f"write to {self.path} after close or discard")
        return self._body.write(memoryview(data).cast("B"))

    def close(self) -> None:
        """Send the object (a second call does nothing)."""
        if self._body is None:
            return
        body, self._body = self._body, None
        body.seek(0)
        sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=self.bucket, Key=self.key, Body=body)
        self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        self._body = None


class ParallelUpload:
    """A multipart upload of one object whose parts are sent concurrently.

    Call order: :meth:`write` any number of times, then :meth:`close` (completes the upload:
    the object appears) or :meth:`discard` (aborts it: nothing appears). Errors of the
    store surface in the call that waits for them (a later ``write``, or ``close``).
    """

    def __init__(self, fs: Any, path: str, part_bytes: int | None = None, in_flight: int | None = None) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.part_bytes = PART_BYTES if part_bytes is None else part_bytes
        self.in_flight = IN_FLIGHT if in_flight is None else in_flight
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._pending: list[tuple[int, Future[Any]]] = []
        self._parts: list[dict[str, Any]] = []
        self._next = 1

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._buf += view
        while len(self._buf) >= self.part_bytes:
            self._send(bytes(self._buf[:self.part_bytes]))
            del self._buf[:self.part_bytes]
        return len(view)

    def _call(self, method: str, **kw: Any) -> Any:
        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **kw)

    def _send(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload")["UploadId"]
        while len(self._pending) >= self.in_flight:
            self._collect_first()
        coro = self.fs._call_s3("upload_part", Bucket=self.bucket, Key=self.key, PartNumber=self._next,
                                UploadId=self._upload_id, Body=body)
        self._pending.append((self._next, asyncio.run_coroutine_threadsafe(coro, self.fs.loop)))
        self._next += 1

    def _collect_first(self) -> None:
        number, fut = self._pending.pop(0)
        out = fut.result()
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if "ChecksumSHA256" in out:
            part["ChecksumSHA256"] = out["ChecksumSHA256"]
        self._parts.append(part)

    def close(self) -> None:
        """Send what is left, wait for every part and complete the upload."""
        try:
            if self._buf or self._upload_id is None:
                self._send(bytes(self._buf))
                self._buf = bytearray()
            while self._pending:
                self._collect_first()
            self._call("complete_multipart_upload", UploadId=self._upload_id,
                       MultipartUpload={"Parts": self._parts})
        except BaseException:
            self.discard()
            raise
        self.fs.invalidate_cache(self.path)

    def discard(self) -> None:
        """Abort the upload (parts still being sent are waited for first: an abort that
        overtakes a part would leave that part behind)."""
        for _, fut in self._pending:
            with contextlib.suppress(BaseException):
                fut.result()
        self._pending = []
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self._upload_id)
            self._upload_id = None
