"""A fault-injecting wrapper around an fsspec filesystem, for the fault sweep.

It counts every storage operation the engine performs (open-for-write, write, close,
rename, rm, listing, pipe, ...) and makes the ``fail_at``-th one fail: with an ``OSError``
(a storage failure the engine must turn into a clear ``CheckpointError``) or with
:class:`Crash`, a ``BaseException`` that stands for the process dying there: after a crash
every further operation raises :class:`Crash` too, so no cleanup code can run.
"""

from __future__ import annotations

from typing import Any


class Crash(BaseException):
    """The simulated death of the process at a storage operation."""


class InjectedError(OSError):
    """The injected storage failure."""


class FaultFS:
    """Wraps ``inner`` (an fsspec filesystem). ``checkpointer_atomic_rename`` selects the
    engine's rename protocol (True) or its object-store protocol (False)."""

    def __init__(
        self, inner: Any, atomic_rename: bool, fail_at: int | None = None, crash: bool = False
    ) -> None:
        self.inner = inner
        self.checkpointer_atomic_rename = atomic_rename
        self.fail_at, self.crash = fail_at, crash
        self.ops: list[str] = []
        self.crashed = False
        self.protocol = inner.protocol

    def _op(self, kind: str, path: Any = "") -> None:
        if self.crashed:
            raise Crash(f"already crashed; {kind} {path}")
        self.ops.append(f"{kind} {path}")
        if len(self.ops) == self.fail_at:
            if self.crash:
                self.crashed = True
                raise Crash(f"crash at op {self.fail_at}: {kind} {path}")
            raise InjectedError(28, f"injected failure at op {self.fail_at}: {kind} {path}")

    def _strip_protocol(self, path: str) -> str:
        return str(self.inner._strip_protocol(path))

    def invalidate_cache(self, path: str | None = None) -> None:
        self.inner.invalidate_cache(path)

    def exists(self, path: str, **kw: Any) -> bool:
        self._op("exists", path)
        return bool(self.inner.exists(path, **kw))

    def find(self, path: str, **kw: Any) -> Any:
        self._op("list", path)
        return self.inner.find(path, **kw)

    def ls(self, path: str, **kw: Any) -> Any:
        self._op("list", path)
        return self.inner.ls(path, **kw)

    def size(self, path: str) -> Any:
        self._op("size", path)
        return self.inner.size(path)

    def cat_file(self, path: str, **kw: Any) -> Any:
        self._op("read", path)
        return self.inner.cat_file(path, **kw)

    def open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        if "r" in mode:
            self._op("open-read", path)
            return self.inner.open(path, mode, **kw)
        self._op("open-write", path)
        return _FaultFile(self, self.inner.open(path, mode, **kw), path)

    def pipe_file(self, path: str, data: bytes, **kw: Any) -> None:
        self._op("pipe", path)
        self.inner.pipe_file(path, data, **kw)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._op("makedirs", path)
        self.inner.makedirs(path, exist_ok=exist_ok)

    def mv(self, src: str, dst: str, **kw: Any) -> None:
        self._op("rename", f"{src} -> {dst}")
        self.inner.mv(src, dst, **kw)

    def rm_file(self, path: str) -> None:
        self._op("rm", path)
        self.inner.rm_file(path)

    def rm(self, path: str, recursive: bool = False, **kw: Any) -> None:
        self._op("rm-tree", path)
        self.inner.rm(path, recursive=recursive, **kw)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"FaultFS does not wrap {name!r}: the engine used an unexpected call")


class _FaultFile:
    def __init__(self, fs: FaultFS, f: Any, path: str) -> None:
        self.fs, self.f, self.path = fs, f, path

    def write(self, data: Any) -> Any:
        self.fs._op("write", self.path)
        return self.f.write(data)

    def close(self) -> None:
        self.fs._op("close", self.path)
        self.f.close()

    def discard(self) -> None:
        if hasattr(self.f, "discard"):
            self.f.discard()
        else:  # a local file: just close it; the engine's own cleanup removes it
            self.f.close()
