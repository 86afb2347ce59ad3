"""Deleting, in the background, checkpoint folders that are already renamed aside.

A checkpoint that retention drops stops being one at once: it is renamed to a hidden
temporary name (:func:`checkpointer.removal.remove_checkpoint`). Deleting its files costs
about as much as writing a small checkpoint, and nothing waits on it, so it runs on one
daemon thread, oldest first, overlapping the training step that follows the save. The
temporary name's owner token stays live until its delete has ended, so no cleanup races
it; a process that exits ends the deletes it queued first (``atexit``), and one killed
midway leaves a leftover that a later cleanup removes. :func:`wait_removals` waits for
them (the manager's ``wait`` and ``close`` do; a save that runs out of space waits and
tries again, see :mod:`checkpointer.commit`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["later", "pending", "wait_removals"]

log = logging.getLogger("checkpointer")
_cond = threading.Condition()
_jobs: deque[Callable[[], None]] = deque()
_running = 0  # jobs taken off the queue and not yet finished
_thread: threading.Thread | None = None


def later(job: Callable[[], None]) -> None:
    """Run ``job`` on the deleting thread (here and now where no thread can start).
    ``job`` handles its own errors; anything it raises is logged."""
    global _thread
    with _cond:
        if _thread is None:
            thread = threading.Thread(target=_work, name="checkpointer-delete", daemon=True)
            with contextlib.suppress(RuntimeError):  # interpreter shutdown: no new threads
                thread.start()
                _thread = thread
        if _thread is not None:
            _jobs.append(job)
            _cond.notify_all()
            return
    job()


def pending() -> bool:
    """Whether a queued delete has not ended yet."""
    with _cond:
        return bool(_jobs) or _running > 0


def wait_removals() -> None:
    """Block until every delete queued in this process has ended."""
    with _cond:
        _cond.wait_for(lambda: not _jobs and _running == 0)


def _work() -> None:
    global _running
    while True:
        with _cond:
            _cond.wait_for(lambda: bool(_jobs))
            job = _jobs.popleft()
            _running += 1
        try:
            job()
        except BaseException as exc:  # a job reports its own errors; never kill the thread
            log.warning("background delete failed: %s", exc)
        finally:
            with _cond:
                _running -= 1
                _cond.notify_all()


def _forget_in_child() -> None:
    """A forked child has no deleting thread: the parent finishes what it queued."""
    global _cond, _jobs, _running, _thread
    _cond, _jobs, _running, _thread = threading.Condition(), deque(), 0, None


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(wait_removals)
