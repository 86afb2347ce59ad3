"""Storage: move bytes to and from a checkpoint directory on any fsspec filesystem.

Two backends implement one small protocol, :class:`Store`. :class:`LocalStore` talks to the OS directly
(``os.write``, ``fsync`` of files and folders, atomic ``rename``); :class:`FsspecStore`
wraps any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...) and treats it as an
object store without atomic rename unless the filesystem says otherwise. Every backend
error leaves as a :class:`~checkpointer.errors.StorageError` (``raise ... from exc``).
The commit protocol built on top lives in :mod:`checkpointer.commit`; this module only
moves bytes, behind the :class:`Store` protocol.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, BinaryIO, Protocol, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
)
from .localio import LocalWriter, open_regular
from .paths import join_url
from .s3_upload import open_object

__all__ = ["Store", "LocalStore", "FsspecStore", "open_store", "split_url"]

_T = TypeVar("_T")


def _guard(what: str, fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{what}: not found ({exc})") from exc
    except (StorageError, CorruptCheckpointError):
        raise
    except Exception as exc:  # backends raise anything: map all of it into our tree
        raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


class Store(Protocol):
    """A checkpoint directory that moves bytes: paths are relative to it, ``/``-separated.

    It knows no manifest, owner or commit rule (those are :mod:`checkpointer.commit`'s).
    Every method raises :class:`StorageError` (or :class:`CheckpointNotFoundError` for a
    missing path) on failure. ``atomic_rename`` says whether :meth:`rename` of a folder is
    atomic (a local disk) or a copy (object stores), which picks the commit protocol.
    ``origin`` is how it was opened, ``(url, storage_options)``, for another process to open
    the same store (``None``: from a ready filesystem object, which cannot be passed on).
    """

    atomic_rename: bool
    url: str
    root: str
    origin: tuple[str, dict[str, Any] | None] | None

    def path(self, rel: str) -> str: ...
    def url_of(self, rel: str) -> str: ...
    def list_files(self) -> list[str]:
        """Every file up to two levels deep (``folder/file``), and folders as ``folder/``."""
        ...
    def list_folder(self, rel: str) -> list[str]:
        """The names of the files directly in folder ``rel``."""
        ...
    def size(self, rel: str) -> int: ...
    def stamp(self, rel: str) -> str:
        """An identity of file ``rel`` that changes whenever it is replaced ("" if unknown)."""
        ...
    def exists(self, rel: str) -> bool: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def open_read(self, rel: str) -> BinaryIO: ...
    def writer(self, rel: str, size_hint: int | None = None) -> contextlib.AbstractContextManager[Any]:
        """A sink whose bytes are durable once the context exits without error;
        ``size_hint``: about how many bytes will come (object stores pick their upload by it)."""
        ...
    def put_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        """Write ``data`` as file ``rel`` in one piece (one object on object stores);
        ``durable=False``: no fsync (a cache that a crash may lose or tear)."""
        ...
    def makedirs(self, rel: str) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def remove_file(self, rel: str) -> None: ...
    def remove_tree(self, rel: str) -> None: ...
    def fsync_dir(self, rel: str) -> None:
        """Make a folder's entries durable (no-op remotely)."""
        ...
    def unfinished_uploads(self) -> list[tuple[str, str]]:
        """``(rel, upload_id)`` of multipart uploads left unfinished under the root."""
        ...
    def abort_upload(self, rel: str, upload_id: str) -> None: ...


class _Rooted:
    """Paths and URLs below a root, shared by the backends."""

    url: str
    root: str
    origin: tuple[str, dict[str, Any] | None] | None = None

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str) -> str:
        return join_url(self.url, rel)


class LocalStore(_Rooted):
    """A folder on local disk: direct OS calls, fsync everywhere, atomic rename."""

    atomic_rename = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.origin = (self.root, None)
        self.url = self.root

    def list_files(self) -> list[str]:
        """Every file up to two levels deep (folder/file), relative to the root."""
        def walk() -> list[str]:
            out: list[str] = []
            if not os.path.isdir(self.root):
                return out
            for entry in os.scandir(self.root):
                if entry.is_dir(follow_symlinks=False):
                    try:  # a folder deleted meanwhile (a background delete, another writer)
                        out += [f"{entry.name}/{sub.name}" for sub in os.scandir(entry.path)]
                    except FileNotFoundError:
                        continue
                    out.append(entry.name + "/")
                else:
                    out.append(entry.name)
            return out
        return _guard(f"listing {self.root}", walk)

    def size(self, rel: str) -> int:
        return _guard(f"stat {self.path(rel)}", lambda: os.stat(self.path(rel)).st_size)

    def stamp(self, rel: str) -> str:
        """Inode, size and mtime: a replacement (always a new file, renamed in) changes it."""
        st = _guard(f"stat {self.path(rel)}", lambda: os.stat(self.path(rel)))
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with open_regular(self.path(rel)) as f:
                return f.read()
        return _guard(f"reading {self.path(rel)}", read)

    def open_read(self, rel: str) -> BinaryIO:
        return _guard(f"opening {self.path(rel)}", lambda: open_regular(self.path(rel)))

    @contextlib.contextmanager
    def writer(self, rel: str, size_hint: int | None = None) -> Iterator[LocalWriter]:
        what = f"writing {self.path(rel)}"
        w = _guard(what, lambda: LocalWriter(self.path(rel)))
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        _guard(what, w.close)

    def put_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        what = f"writing {self.path(rel)}"
        w = _guard(what, lambda: LocalWriter(self.path(rel)))
        try:
            _guard(what, lambda: w.write(data))
        except BaseException:
            w.abort()
            raise
        _guard(what, lambda: w.close(durable))

    def makedirs(self, rel: str) -> None:
        _guard(f"creating {self.path(rel)}", lambda: os.makedirs(self.path(rel), exist_ok=True))

    def rename(self, src: str, dst: str) -> None:
        _guard(f"renaming {src} to {dst}", lambda: os.rename(self.path(src), self.path(dst)))

    def remove_file(self, rel: str) -> None:
        _guard(f"deleting {self.path(rel)}", lambda: os.unlink(self.path(rel)))

    def list_folder(self, rel: str) -> list[str]:
        return _guard(f"listing {self.path(rel)}",
                      lambda: [e.name for e in os.scandir(self.path(rel)) if not e.is_dir()])

    def remove_tree(self, rel: str) -> None:
        """Delete folder ``rel`` and everything in it (no ordering: see ``commit.remove_checkpoint``);
        a symbolic link in its place is removed, not followed."""
        path = self.path(rel)
        if os.path.islink(path) or os.path.isfile(path):
            _guard(f"deleting {path}", lambda: os.unlink(path))
        else:
            _guard(f"deleting {path}", lambda: shutil.rmtree(path, onerror=partial(_gone_is_fine, path)))

    def unfinished_uploads(self) -> list[tuple[str, str]]:
        return []  # a local write leaves a file, never an upload

    def abort_upload(self, rel: str, upload_id: str) -> None:
        raise StorageError(f"{self.root} is a local folder: there is no upload {upload_id!r} to abort")

    def fsync_dir(self, rel: str) -> None:
        def sync() -> None:
            fd = os.open(self.path(rel), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _guard(f"fsync of folder {self.path(rel)}", sync)


def _gone_is_fine(top: str, func: Any, path: str, exc_info: Any) -> None:
    """``rmtree``'s error hook: a file or folder inside ``top`` deleted meanwhile (by a
    background delete or another writer) is what we wanted; any other error is raised."""
    if path == top or not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


class FsspecStore(_Rooted):
    """Any fsspec filesystem; an object store (manifest-last commit) unless it declares
    ``checkpointer_atomic_rename = True``."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        # Local files are not atomic objects (open("wb") truncates in place): rename there.
        self.atomic_rename = bool(getattr(fs, "checkpointer_atomic_rename", isinstance(fs, LocalFileSystem)))

    def list_files(self) -> list[str]:
        def walk() -> list[str]:
            if not self.fs.exists(self.root):
                return []
            found = self.fs.find(self.root, maxdepth=2, withdirs=True, detail=True)
            out = []
            for p, info in found.items():
                rel = posixpath.relpath(p.rstrip("/"), self.root)
                if rel == "." or rel.startswith(".."):
                    continue
                out.append(rel + "/" if info.get("type") == "directory" else rel)
            return out
        self.fs.invalidate_cache(self.root)
        # invalidate_cache(root) keeps the cached listings of sub-folders (s3fs): another
        # process may have changed them, so drop those too.
        cache = getattr(self.fs, "dircache", None)
        if cache is not None:
            for key in [k for k in list(cache) if str(k).startswith(self.root + "/")]:
                cache.pop(key, None)
        return _guard(f"listing {self.url}", walk)

    def size(self, rel: str) -> int:
        return int(_guard(f"stat {self.url_of(rel)}", lambda: self.fs.size(self.path(rel))))

    def stamp(self, rel: str) -> str:
        """The object's ETag (S3), md5/generation (GCS), else its size and time."""
        info = _guard(f"stat {self.url_of(rel)}", lambda: self.fs.info(self.path(rel)))
        for key in ("ETag", "etag", "generation", "md5Hash"):
            if info.get(key):
                return f"{key}:{info[key]}"
        when = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
        return f"{info.get('size')}:{when}" if when else ""

    def exists(self, rel: str) -> bool:
        return bool(_guard(f"checking {self.url_of(rel)}", lambda: self.fs.exists(self.path(rel))))

    def read_bytes(self, rel: str) -> bytes:
        return bytes(_guard(f"reading {self.url_of(rel)}", lambda: self.fs.cat_file(self.path(rel))))

    def open_read(self, rel: str) -> BinaryIO:
        f: BinaryIO = _guard(f"opening {self.url_of(rel)}", lambda: self.fs.open(self.path(rel), "rb"))
        return f

    @contextlib.contextmanager
    def writer(self, rel: str, size_hint: int | None = None) -> Iterator[Any]:
        what = f"writing {self.url_of(rel)}"
        f = _guard(what, lambda: open_object(self.fs, self.path(rel), size_hint))
        try:
            yield _GuardedWriter(f, what)
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard() if hasattr(f, "discard") else None
            raise
        _guard(what, f.close)

    def put_bytes(self, rel: str, data: bytes, durable: bool = True) -> None:
        _guard(f"writing {self.url_of(rel)}", lambda: self.fs.pipe_file(self.path(rel), data))

    def makedirs(self, rel: str) -> None:
        _guard(f"creating {self.url_of(rel)}", lambda: self.fs.makedirs(self.path(rel), exist_ok=True))

    def rename(self, src: str, dst: str) -> None:
        _guard(f"renaming {src} to {dst}", lambda: self.fs.mv(self.path(src), self.path(dst), recursive=True))

    def remove_file(self, rel: str) -> None:
        _guard(f"deleting {self.url_of(rel)}", lambda: self.fs.rm_file(self.path(rel)))

    def list_folder(self, rel: str) -> list[str]:
        def ls() -> list[str]:
            self.fs.invalidate_cache(self.path(rel))
            return [posixpath.basename(i["name"].rstrip("/")) for i in self.fs.ls(self.path(rel), detail=True)
                    if i.get("type") != "directory"]
        return _guard(f"listing {self.url_of(rel)}", ls)

    def remove_tree(self, rel: str) -> None:
        """Delete folder ``rel`` and everything in it (no ordering: see ``commit.remove_checkpoint``)."""
        _guard(f"deleting {self.url_of(rel)}", lambda: self.fs.rm(self.path(rel), recursive=True))

    def fsync_dir(self, rel: str) -> None:
        """Object stores have no folder entries to make durable."""

    def _bucket_key(self, rel: str = "") -> tuple[str, str]:
        bucket, _, prefix = self.root.partition("/")
        return bucket, posixpath.join(prefix, rel) if rel else (prefix + "/" if prefix else "")

    def unfinished_uploads(self) -> list[tuple[str, str]]:
        """Unfinished S3 multipart uploads under the root (s3fs only; ``[]`` elsewhere)."""
        if not callable(getattr(self.fs, "call_s3", None)):
            return []
        bucket, prefix = self._bucket_key()

        def scan() -> list[tuple[str, str]]:
            out: list[tuple[str, str]] = []
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            while True:
                page = self.fs.call_s3("list_multipart_uploads", **kw)
                out += [(u["Key"][len(prefix):], u["UploadId"]) for u in page.get("Uploads", [])]
                if not page.get("IsTruncated"):
                    return out
                kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
        return _guard(f"listing unfinished uploads under {self.url}", scan)

    def abort_upload(self, rel: str, upload_id: str) -> None:
        bucket, key = self._bucket_key(rel)
        _guard(f"aborting the upload of {self.url_of(rel)}", lambda: self.fs.call_s3(
            "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id))


class _GuardedWriter:
    def __init__(self, f: Any, what: str) -> None:
        self.f, self.what = f, what

    def write(self, data: Any) -> None:
        _guard(self.what, lambda: self.f.write(data))


def split_url(url: str) -> tuple[str, str]:
    """``(parent, name)`` of a checkpoint URL or path."""
    text = os.fspath(url).rstrip("/")
    parent, _, name = text.rpartition("/")
    if not name:
        raise ConfigurationError(f"{url!r} does not name a checkpoint")
    if "://" in text and "://" not in parent + "/":
        raise ConfigurationError(f"{url!r} names a bucket, not a checkpoint inside one")
    return (parent or "."), name


def open_store(directory: str | os.PathLike[str], storage_options: dict[str, Any] | None = None,
               filesystem: Any = None) -> Store:
    """The :class:`Store` for ``directory`` (a path or any fsspec URL).

    ``filesystem`` may pass a ready fsspec filesystem (tests use it to inject faults).
    """
    text = os.fspath(directory)
    if filesystem is not None:
        return FsspecStore(filesystem, filesystem._strip_protocol(text), text)
    try:
        fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
    except ImportError as exc:
        raise ConfigurationError(f"no fsspec backend for {text!r}: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot open {text!r}: {exc}") from exc
    if isinstance(fs, LocalFileSystem):  # os calls: fsync of files and folders
        return LocalStore(root)
    store = FsspecStore(fs, root, text)
    store.origin = (text, storage_options)
    return store
