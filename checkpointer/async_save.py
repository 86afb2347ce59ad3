"""Background saving: snapshot into a reused staging arena, write on one thread.

The caller's arrays are copied into one staging arena (a single byte buffer, allocated
on the first save and grown only when the state grows), laid out 64-byte aligned,
little-endian and contiguous so the writer never copies again. The call then returns;
one worker thread streams, checksums and commits from the arena.

At most one save is in flight; staging the next one waits for it (its arena is about to
be reused). A background failure is kept and raised by the next call into the manager,
by ``wait`` or by ``close`` (and logged when it happens, so it is never lost even at
exit). The worker is a ``concurrent.futures`` thread, which the interpreter joins at
exit: a save still running when the program ends completes.

An interrupt (``KeyboardInterrupt``, any ``BaseException``) can land anywhere in the
caller's thread, so a save is recorded as in flight *before* it is handed to the worker
and forgotten only once its outcome is collected: once waiting for it returned, or raised
the save's own error. An interrupt while waiting leaves it in flight (the next ``stage``,
``wait`` or ``close`` waits again); one inside ``submit`` leaves it in flight too, queued
or not: the next call into the writer queues it (a save queued twice runs once). Two saves
therefore never share the arena, and a checkpoint commits exactly the state staged for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np

from .errors import InsufficientMemoryError
from .sharding import Shard, ShardedArray

__all__ = ["AsyncWriter"]

log = logging.getLogger("checkpointer")
_ALIGN = 64
NICE = 5  # niceness added to the writer thread; 0 disables
_P = TypeVar("_P")


def _staged_dtype(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


class _Save(Future[Any], Generic[_P]):
    """One background save: the job, what the caller says it is, and (as a future) its
    outcome. It may be queued twice (see :meth:`AsyncWriter.wait`): it runs once."""

    def __init__(self, job: Callable[[], Any], pending: _P, label: str) -> None:
        super().__init__()
        self.job, self.pending, self.label = job, pending, label
        self.queued = False  # set once a worker's queue is known to hold it (or it ran)
        self._taken = threading.Lock()

    def run(self) -> None:
        if not self._taken.acquire(blocking=False):  # already run, or running
            return
        try:
            result = _logged(self.label, self.job)
        except BaseException as exc:  # the save's own error: kept for whoever collects it
            self.set_exception(exc)
        else:
            self.set_result(result)


class AsyncWriter(Generic[_P]):
    """One background writer thread with a reused staging arena.

    Call order: :meth:`stage` (waits for the previous save, copies) -> :meth:`submit`
    (starts the write) -> ... -> :meth:`wait` / :meth:`close`. Used from one thread.
    ``_P`` is whatever the caller hands :meth:`submit` to describe the job (the manager's
    save plan); :attr:`pending` gives it back while the job is in flight.
    """

    def __init__(self) -> None:
        self._executor = _new_executor()
        self._future: _Save[_P] | None = None  # in flight until its outcome is collected
        self._arena = np.empty(0, dtype=np.uint8)
        self._closed = False

    @property
    def capacity(self) -> int:
        """Bytes held by the staging arena."""
        return int(self._arena.nbytes)

    @property
    def busy(self) -> bool:
        """True while a save is in flight (or finished but not yet collected)."""
        return self._future is not None

    @property
    def pending(self) -> _P | None:
        """What :meth:`submit` was told about the save in flight, if any."""
        save = self._future
        return None if save is None else save.pending

    def stage(self, arrays: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Copy ``arrays`` (numpy arrays, or :class:`ShardedArray` whose pieces are copied)
        into the arena; later mutation of the originals is harmless.

        Waits for the in-flight save first (raising its error, if any).

        Raises:
            CheckpointError: the arena must grow and the memory cannot be allocated (the
                old arena is freed then, and nothing is in flight).
        """
        self.wait()
        parts = [[s.data for s in v.shards] if isinstance(v, ShardedArray) else [v] for _, v in arrays]
        offsets, end = [], 0
        for arr in (a for srcs in parts for a in srcs):
            offsets.append(end)
            end += -(-arr.nbytes // _ALIGN) * _ALIGN
        if end > self._arena.nbytes:
            self._arena = np.empty(0, dtype=np.uint8)  # free the old one before growing
            self._arena = _aligned_empty(end)
        at = iter(offsets)
        staged: list[tuple[str, Any]] = []
        for (key, v), srcs in zip(arrays, parts, strict=True):
            copies = [self._copy(a, next(at)) for a in srcs]
            if isinstance(v, ShardedArray):
                shards = tuple(Shard(s.offsets, c) for s, c in zip(v.shards, copies, strict=True))
                staged.append((key, ShardedArray(v.shape, _staged_dtype(v.dtype), shards)))
            else:
                staged.append((key, copies[0]))
        return staged

    def _copy(self, arr: np.ndarray, off: int) -> np.ndarray:
        buf = self._arena[off : off + arr.nbytes].view(_staged_dtype(arr.dtype)).reshape(arr.shape)
        np.copyto(buf, arr, casting="equiv")
        return buf

    def submit(self, job: Callable[[], Any], *, pending: _P, label: str) -> None:
        """Run ``job`` in the background (after any previous job has finished).

        ``pending`` is :attr:`pending` until the job's outcome is collected; ``label`` names
        the job in the log when it fails.
        """
        self.wait()
        save = _Save(job, pending, label)
        self._future = save  # in flight from here on, whatever interrupts what follows
        if self._start(save):
            self.wait()  # it ran in this thread: its error is raised now

    def _start(self, save: _Save[_P]) -> bool:
        """Queue ``save`` on the worker; True when it had to run in this thread instead."""
        if self._closed:  # used again after close(): start a fresh worker
            self._executor, self._closed = _new_executor(), False
        try:
            self._executor.submit(save.run)
        except RuntimeError:  # the interpreter is shutting down: save in this thread
            save.run()
            save.queued = True
            return True
        save.queued = True
        return False

    def raise_error(self) -> None:
        """Raise the error of a finished background save, if any (once); queue a save that
        an interrupted :meth:`submit` left unqueued."""
        save = self._future
        if save is not None and not save.queued:
            self._start(save)
        if save is not None and save.done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight save ends; raise its error.

        Interrupted (the exception is not the save's own), the save stays in flight.
        """
        save = self._future
        if save is None:
            return
        if not save.queued:  # an interrupted submit may not have queued it
            self._start(save)
        try:
            save.result()
        except BaseException as exc:
            if save.done() and save.exception() is exc:  # the save's own error: collected
                self._future = None
            raise
        self._future = None

    def close(self) -> None:
        """Wait for the in-flight save, then stop the worker thread and free the arena.

        Interrupted while waiting, the save stays in flight and the worker keeps running:
        a later :meth:`wait` or :meth:`close` collects it.
        """
        try:
            self.wait()
        finally:
            if self._future is None:
                self._closed = True
                self._executor.shutdown(wait=True)
                self._arena = np.empty(0, dtype=np.uint8)


def _new_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="checkpointer-save", initializer=_lower_priority
    )


def _lower_priority() -> None:
    """Nice the writer thread a little (Linux: per thread), so that on a machine without a
    spare core the training loop keeps the CPU and the save takes what is left."""
    if not sys.platform.startswith("linux"):  # elsewhere a thread id is not a pid
        return
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))


def _aligned_empty(nbytes: int) -> np.ndarray:
    try:
        raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    except MemoryError as exc:
        raise InsufficientMemoryError(
            f"cannot allocate {nbytes} bytes of staging memory for an async save: {exc} "
            "(free host memory, or save with async_save=False)"
        ) from exc
    shift = -raw.ctypes.data % _ALIGN
    return raw[shift : shift + nbytes]


def _logged(name: str, job: Callable[[], Any]) -> Any:
    try:
        return job()
    except BaseException as exc:
        log.error(
            "background save of %s failed (raised again by the next call): %s: %s",
            name,
            type(exc).__name__,
            exc,
        )
        raise
