"""Background saving: snapshot into reused staging buffers, write on one thread.

At most one save is in flight; staging the next one waits for it (its buffers are about
to be reused). A background failure is kept and raised by the next call into the
manager, by ``wait`` or by ``close``: never lost. The worker thread is joined at
interpreter exit (``concurrent.futures`` does that for its threads), so a save still
running when the program ends completes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .retention import Record

__all__ = ["AsyncWriter"]


class AsyncWriter:
    """One background writer with staging buffers allocated once and grown when needed."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpointer-save")
        self._future: Future[Any] | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self.pending_seq = -1
        self.pending_record: Record | None = None

    def stage(self, arrays: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
        """Copy ``arrays`` into staging buffers; later mutation of the originals is harmless."""
        self.wait()
        staged = []
        for key, arr in arrays:
            buf = self._buffers.get(key)
            if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
                buf = np.empty(arr.shape, dtype=arr.dtype)
                self._buffers[key] = buf
            np.copyto(buf, arr, casting="no")
            staged.append((key, buf))
        if len(self._buffers) > len(staged):
            keep = {k for k, _ in staged}
            self._buffers = {k: v for k, v in self._buffers.items() if k in keep}
        return staged

    def submit(self, seq: int, record: Record, job: Callable[[], Any]) -> None:
        """Run ``job`` in the background (after any previous job has finished)."""
        self.wait()
        self.pending_seq, self.pending_record = seq, record
        self._future = self._executor.submit(job)

    def raise_error(self) -> None:
        """Raise the error of a finished background save, if any (once)."""
        if self._future is not None and self._future.done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight save ends; raise its error."""
        future, self._future = self._future, None
        if future is None:
            return
        try:
            future.result()
        finally:
            self.pending_record = None

    def close(self) -> None:
        """Wait for the in-flight save, then stop the worker thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._buffers = {}
