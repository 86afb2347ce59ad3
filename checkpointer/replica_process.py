"""A replica copy in a child process of its own, at a lower CPU priority.

Copying to an object store runs s3fs and aiohttp, which do much of their work in Python with
the GIL held: in a thread of the training process they stall the training loop (measured on
2 cores: steps 22% slower on average during a copy, with 4-10x longer p99 steps). A child
process has its own GIL, and niced it yields the CPU to the loop (+3% in the same run,
``benchmarks/bench_replica.py``).

:class:`CopyProcess` runs :func:`~checkpointer.replica.copy_checkpoint` in
``python -m checkpointer.replica_process``, one child per replica, started at the first copy
and kept: the request (both stores as URLs with their ``storage_options``) goes as the first
JSON line on the child's stdin, then one line per copy (the checkpoint's name); each outcome
comes back as one JSON line on its stdout (``Committed`` fields, or the error's class name
and message, raised again here as the same :mod:`checkpointer.errors` class).

The child:
- lowers its priority by :data:`checkpointer.async_save.NICE`, as the async writer's thread;
- ignores SIGINT and the usual preemption signals (a Ctrl-C or a SLURM/Kubernetes signal to
  the whole process group is the parent's to handle: the copy in flight completes, and the
  parent's ``close()`` waits for it);
- exits when its stdin reaches end of file (the replica's ``close()``), and at once when the
  parent dies (Linux: ``PR_SET_PDEATHSIG``; elsewhere at that end of file): a killed
  training process leaves no copy running, only the unfinished upload the next run cleans
  up, as after any crash. A copy is never visible half-done, whatever stops it.

:func:`child_request` says whether a copy can go to a child: only between stores opened
from URLs whose options are plain JSON, and not for ``memory://`` (a child cannot see the
parent's memory) or a copy between local folders (the OS does that work without the GIL).
Otherwise the replica copies in its thread as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from typing import IO, Any

from . import errors
from .async_save import NICE
from .commit import Committed
from .errors import CheckpointError, StorageError
from .manifest import Manifest, read_manifest
from .replica import copy_checkpoint, copy_with_manifest
from .storage import Store, open_store

__all__ = ["child_request", "Copier", "CopyProcess", "CopyProcessError", "MODE"]

MODE = "auto"
"""When copies go to a child: ``"auto"`` (to remote stores), ``"always"`` (local folders
too, where a URL allows it) or ``"never"`` (in the replica's thread)."""

_IGNORED = ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
log = logging.getLogger("checkpointer")
_STDERR_TAIL = 2000
_PR_SET_PDEATHSIG = 1


def child_request(source: tuple[str, dict[str, Any] | None] | None,
                  dest: tuple[str, dict[str, Any] | None] | None) -> dict[str, Any] | None:
    """The JSON request for copies from ``source`` to ``dest`` (each ``(url, options)``,
    ``None`` where a store was not opened from a URL), or ``None`` when a child cannot or
    need not do them."""
    if source is None or dest is None or MODE == "never":
        return None
    if "memory" in (_protocol(source[0]), _protocol(dest[0])):
        return None
    if MODE == "auto" and _protocol(dest[0]) in ("file", "local"):
        return None
    request = {"source": list(source), "dest": list(dest)}
    try:
        if json.loads(json.dumps(request)) != request:  # tuples, non-str keys: not plain JSON
            return None
    except (TypeError, ValueError):
        return None
    return request


def _protocol(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.split("::")[0] if sep else "file"


class CopyProcessError(StorageError):
    """The copy process could not start, or died without an answer."""


class CopyProcess:
    """A child process that copies checkpoints as ``request`` (from :func:`child_request`)
    says, started at the first copy and kept for the next ones (its imports and its
    connections paid once); started again after it died. One caller at a time."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self._proc: subprocess.Popen[str] | None = None
        self._err: IO[bytes] | None = None

    def copy(self, name: str) -> Committed:
        """Copy checkpoint ``name``; what the commit reports.

        Raises:
            CheckpointError: the copy's own error (the same class).
            CopyProcessError: the child could not start, or died without an answer.
        """
        proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"name": name}) + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
        except OSError:
            answer = ""
        if not answer:  # it died: say how, and start a new one next time
            status, tail = self._stop(), self._tail()
            raise CopyProcessError(f"the replica copy process died (exit status {status}) without an answer"
                               + (f": {tail}" if tail else ""))
        return _outcome(answer)

    def _start(self) -> subprocess.Popen[str]:
        self.close()
        self._err = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "checkpointer.replica_process"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                    text=True, close_fds=True)
        except OSError as exc:
            raise CopyProcessError(f"cannot start the replica copy process: {exc}") from exc
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # a child that died at once: seen at the answer
            proc.stdin.write(json.dumps(self.request) + "\n")
        self._proc = proc
        return proc

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        for stream in (proc.stdin, proc.stdout):  # end of file on stdin: the child exits
            with contextlib.suppress(OSError):
                stream.close() if stream is not None else None
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _tail(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(0)
        return self._err.read()[-_STDERR_TAIL:].decode(errors="replace").strip()

    def close(self) -> None:
        """Stop the child (idle: callers wait for their copies first)."""
        self._stop()
        if self._err is not None:
            self._err.close()
            self._err = None


class Copier:
    """The replica tier's copies: in a :class:`CopyProcess` where :func:`child_request`
    allows one, else in the caller's thread. A child that cannot start or dies sends the
    copies to the caller's thread from then on (a warning). One caller at a time."""

    def __init__(self) -> None:
        self._process: CopyProcess | None = None
        self._broken = False

    def copy(self, source: Store, name: str, dest: Store) -> tuple[Committed, Manifest]:
        """:func:`~checkpointer.replica.copy_with_manifest` of checkpoint ``name`` (the
        manifest read back from ``dest`` when a child copied)."""
        request = None if self._broken else child_request(source.origin, dest.origin)
        if request is None:
            return copy_with_manifest(source, name, dest)
        if self._process is None or self._process.request != request:
            self.close()
            self._process = CopyProcess(request)
        try:
            committed = self._process.copy(name)
        except CopyProcessError as exc:
            self.close()
            self._broken = True
            log.warning("%s; copying to %s in this process from now on", exc, dest.url)
            return copy_with_manifest(source, name, dest)
        return committed, read_manifest(dest, name)

    def close(self) -> None:
        """Stop the child, if one runs (a later copy starts another)."""
        if self._process is not None:
            self._process.close()
            self._process = None


def _outcome(answer: str) -> Committed:
    try:
        out = json.loads(answer)
        if out["ok"]:
            return Committed(int(out["nbytes"]), str(out["stamp"]))
        kind, message = str(out["error"]), str(out["message"])
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"the replica copy process answered {answer[:200]!r}") from None
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, CheckpointError)):
        cls = StorageError
    raise cls(message)


def _child() -> int:
    """The child's side: the request (stores), then one line per copy, each answered."""
    for sig in _IGNORED:
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_IGN)
    _die_with_parent()
    if NICE and hasattr(os, "nice"):
        os.nice(NICE)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=_read_until_parent_goes, args=(lines,), daemon=True).start()
    request = json.loads(lines.get())
    src = dst = None
    while True:
        name = json.loads(lines.get())["name"]
        try:
            if src is None or dst is None:
                src = open_store(request["source"][0], request["source"][1])
                dst = open_store(request["dest"][0], request["dest"][1])
            done = copy_checkpoint(src, name, dst)
            out: dict[str, Any] = {"ok": True, "nbytes": done.nbytes, "stamp": done.stamp}
        except CheckpointError as exc:
            out = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        except OSError as exc:
            out = {"ok": False, "error": "StorageError", "message": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def _read_until_parent_goes(lines: queue.SimpleQueue[str]) -> None:
    for line in sys.stdin:
        lines.put(line)
    os._exit(3)  # end of file: the parent closed the pipe or is gone


def _die_with_parent() -> None:
    """Linux: the kernel kills this process the moment its parent dies (the stdin watch
    below does it elsewhere, a little later)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(3)


if __name__ == "__main__":
    sys.exit(_child())
