"""Local files the way a checkpoint needs them: a buffered writer straight onto a file
descriptor that fsyncs (overlapping the disk wait with the caller's checksums), and a
read-only open that refuses anything but a regular file."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from typing import Any, BinaryIO

from .errors import CorruptCheckpointError

__all__ = ["LocalWriter", "open_regular"]

_WRITE_BUFFER = 8 << 20


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading; anything but a regular file is refused (a FIFO would block,
    a device like /dev/zero would never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptCheckpointError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class LocalWriter:
    """Buffered writer straight onto a file descriptor; fsync on close."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.buf = bytearray()
        self._sync: threading.Thread | None = None
        self._sync_errors: list[BaseException] = []
        self._synced = False  # a started fsync covers every byte written so far

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if len(self.buf) + len(view) <= _WRITE_BUFFER:
            self.buf += view
            return
        self._flush()
        if len(view) < _WRITE_BUFFER:
            self.buf += view
        else:
            self._write_all(view)

    def _write_all(self, view: memoryview) -> None:
        self._synced = False
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _flush(self) -> None:
        if self.buf:
            self._write_all(memoryview(self.buf))
            self.buf = bytearray()

    def start_sync(self) -> None:
        """Flush and start ``fsync`` on a helper thread, so the caller's CPU work (checksums)
        overlaps the disk wait; :meth:`close` joins it, raises its error, and syncs again
        only if something was written since."""
        self._flush()
        sync = threading.Thread(target=self._fsync_to, args=(self._sync_errors,),
                                name="checkpointer-fsync", daemon=True)
        try:
            sync.start()
        except RuntimeError:  # no new threads at interpreter shutdown: close() syncs
            return
        self._sync, self._synced = sync, True

    def _fsync_to(self, errors: list[BaseException]) -> None:
        try:
            os.fsync(self.fd)
        except BaseException as exc:  # handed to close() in the caller's thread
            errors.append(exc)

    def _join_sync(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None

    def close(self, durable: bool = True) -> None:
        try:
            self._flush()
            self._join_sync()
            if self._sync_errors:
                raise self._sync_errors[0]
            if durable and not self._synced:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        self._join_sync()
        with contextlib.suppress(OSError):
            os.close(self.fd)
