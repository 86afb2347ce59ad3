"""File checkpoints: a checkpoint that is one file written by a payload writer.

A framework's own file (Keras's ``.weights.h5`` / ``.keras``) must sit at the path the user
named, so that the framework reads it unchanged. With ``CheckpointManager(...,
payload=writer, filename="best.weights.h5")`` each checkpoint is that one file,
``<directory>/<name>``, written by ``writer(state, local_path)`` (``state`` is whatever the
caller passed to ``epoch_end`` / ``step_end`` / ``save``, e.g. the model), and the manager
commits, indexes, ranks, retains and (with ``async_save``) writes it in the background like
any other checkpoint.

Its manifest is a hidden sidecar, ``<directory>/.<name>.ckpt-manifest``: a version 1
manifest (no arrays) whose ``payload`` field records the file's length, crc32c and identity
(:meth:`~checkpointer.storage.Store.stamp`) beside the usual step, epoch, metrics and time.
A sidecar counts only while its file is the one it describes (same identity): a file
replaced by someone else is no longer a checkpoint of the engine's (never deleted by
retention), and a sidecar whose file is gone is removed when the directory is opened.

Call order: :func:`stage_file` in the caller's thread (the writer runs there: frameworks
read their variables on the training thread) into ``.ckpt-tmp-<name>-<owner>/<name>`` (a
local temporary folder for remote stores), then :meth:`StagedFile.commit` (the writer
thread with ``async_save``): the file's checksum, the file moved into place in one step
(``os.replace`` locally, one ``mv`` elsewhere), then its sidecar. Readers see the old file
or the new one, never a torn one; startup cleanup removes a dead writer's temporary folder.

Limits: no replica and one process only (refused at construction); ``restore`` reads state
checkpoints, not these files: a framework reads them (``model.load_weights(info.url)``).
This module also holds :func:`local_copy` (a local path to such a file, checked first) and
:func:`fresh_run`, ``CheckpointManager(rank_existing=False)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from .checksum import crc32c
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    ConfigurationError,
    ManifestError,
    StorageError,
)
from .frame import decode_framed
from .index import Entry, entry_from_manifest
from .manifest import MANIFEST_MAGIC, FileRow, Manifest, parse
from .owners import new_owner, release_owner
from .plan import Scored
from .storage import LocalStore, Store, open_store, split_url
from .tree import flatten, resolve_state

__all__ = ["PayloadWriter", "SIDECAR_SUFFIX", "sidecar", "check_payload", "StagedFile",
           "stage_file", "file_names", "is_file_checkpoint", "read_file_manifest", "file_entry",
           "file_entries", "verify_file", "remove_file_checkpoint", "local_copy", "prepare",
           "fresh_run"]

log = logging.getLogger("checkpointer")
PayloadWriter = Callable[[Any, str], None]
SIDECAR_SUFFIX = ".ckpt-manifest"
_MAX_SIDECAR = 1 << 20
_CHUNK = 8 << 20
TMP_PREFIX = ".ckpt-tmp-"  # removal.TMP_PREFIX (which imports this module): cleanup knows it


def sidecar(name: str) -> str:
    """The hidden manifest beside file checkpoint ``name``."""
    return f".{name}{SIDECAR_SUFFIX}"


def check_payload(payload: PayloadWriter | None, filename: str | None, replica: Any,
                  world_size: int) -> PayloadWriter | None:
    """Validate ``CheckpointManager(payload=...)``.

    Raises:
        ConfigurationError: a writer that is not callable, or one without a ``filename``
            (the file's name), with a replica, or with several processes.
    """
    if payload is None:
        return None
    problem = ("is not callable" if not callable(payload) else
               "needs filename= (the file's name, e.g. 'best.weights.h5')" if not filename else
               "cannot be combined with replica=" if replica is not None else
               "writes from one process only" if world_size > 1 else None)
    if problem:
        raise ConfigurationError(f"payload={payload!r} {problem}")
    return payload


class _Done(NamedTuple):
    nbytes: int
    stamp: str


@dataclass
class StagedFile:
    """A complete file under a temporary name, waiting for :meth:`commit`."""

    store: Store
    name: str
    folder: str  # the temporary folder in the store (beside the target when local)
    local: str  # the bytes on local disk
    owner: str
    local_dir: str | None = None  # a local temporary folder (remote stores)

    def commit(self, fields: dict[str, Any]) -> _Done:
        """Move the file into place, then write its sidecar with ``fields``; returns the
        bytes on storage and the sidecar's identity. The temporary copy is gone afterwards.

        Raises:
            StorageError: the store refused a write or a move (the previous file stays).
        """
        store, name = self.store, self.name
        try:
            nbytes, crc = _checksum(self.local)
            if self.local_dir is not None:  # remote: upload beside the target, then one move
                with store.writer(f"{self.folder}/{name}") as w, open(self.local, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        w.write(chunk)
            else:
                with open(self.local, "rb") as f:
                    os.fsync(f.fileno())
            store.rename(f"{self.folder}/{name}", name)
            stamp = _stamp(store, name)
            record = {"name": name, "nbytes": nbytes, "crc32c": crc, "stamp": stamp}
            tree, _ = flatten({})
            blob = Manifest(tree, (), (), fields={**fields, "payload": record}).encode()
            if store.atomic_rename:
                store.put_bytes(f"{self.folder}/{sidecar(name)}", blob)
                store.rename(f"{self.folder}/{sidecar(name)}", sidecar(name))
                store.fsync_dir("")
            else:
                store.put_bytes(sidecar(name), blob)
            return _Done(nbytes + len(blob), _stamp(store, sidecar(name)))
        except OSError as exc:
            raise StorageError(f"save of {store.url_of(name)} failed: {exc}") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary copies (idempotent)."""
        with contextlib.suppress(CheckpointError):
            if self.store.exists(self.folder):
                self.store.remove_tree(self.folder)
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)
        release_owner(self.owner)


def stage_file(store: Store, name: str, state: Any, write: PayloadWriter) -> StagedFile:
    """Have ``write(state, path)`` write checkpoint ``name`` under a temporary name (the
    path ends with ``name``, so its suffix is the one the framework expects)."""
    owner = new_owner()
    folder = f"{TMP_PREFIX}{name}-{owner}"
    store.makedirs(folder)
    local_dir = None if isinstance(store, LocalStore) else tempfile.mkdtemp(prefix="ckpt-file-")
    local = os.path.join(local_dir, name) if local_dir else store.path(f"{folder}/{name}")
    staged = StagedFile(store, name, folder, local, owner, local_dir)
    try:
        write(state, local)
    except BaseException:
        staged.abort()
        raise
    return staged


def _checksum(path: str) -> tuple[int, int]:
    nbytes = crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            nbytes, crc = nbytes + len(chunk), crc32c(chunk, crc)
    return nbytes, crc


def _stamp(store: Store, rel: str) -> str:
    try:
        return store.stamp(rel)
    except CheckpointError:
        return ""


def file_names(listing: list[str]) -> list[str]:
    """File checkpoints of a listing: top-level files with a sidecar beside them."""
    files = {p for p in listing if "/" not in p}
    return sorted(p[1:-len(SIDECAR_SUFFIX)] for p in files
                  if p.startswith(".") and p.endswith(SIDECAR_SUFFIX)
                  and p[1:-len(SIDECAR_SUFFIX)] in files)


def is_file_checkpoint(store: Store, name: str) -> bool:
    """Whether ``name`` is a file with a sidecar manifest."""
    return "/" not in name and not name.startswith(".") and store.exists(sidecar(name))


def _sidecar_body(store: Store, name: str) -> Manifest:
    """The sidecar of ``name`` as stored, its ``payload`` record checked."""
    rel, where = sidecar(name), store.url_of(sidecar(name))
    try:
        size = store.size(rel)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{store.url_of(name)} is not a checkpoint (no {rel})") from None
    if size > _MAX_SIDECAR:
        raise ManifestError(f"{where}: {size} bytes, over the cap of {_MAX_SIDECAR}")
    m = parse(decode_framed(store.read_bytes(rel), MANIFEST_MAGIC, where, _MAX_SIDECAR), where)
    p = m.get("payload")
    if not (isinstance(p, dict) and p.get("name") == name and type(p.get("nbytes")) is int
            and type(p.get("crc32c")) is int and isinstance(p.get("stamp"), str) and not m.files):
        raise ManifestError(f"{where}: not the manifest of a file checkpoint named {name!r}")
    return m


def read_file_manifest(store: Store, name: str) -> Manifest:
    """The manifest of file checkpoint ``name``: its sidecar, with one file row (the
    file's length and crc32c) and without the ``payload`` record.

    Raises:
        CheckpointNotFoundError: no sidecar.
        CorruptCheckpointError: (a subclass of) the sidecar breaks a rule.
    """
    m = _sidecar_body(store, name)
    p = m.get("payload")
    row = FileRow(name, p["nbytes"], p["crc32c"])
    return Manifest(m.tree, (row,), (), fields={k: v for k, v in m.fields.items() if k != "payload"})


def file_entry(store: Store, name: str) -> Entry:
    """The entry of file checkpoint ``name``, read from its sidecar."""
    return entry_from_manifest(store, name, read_file_manifest(store, name), store.size(sidecar(name)),
                               _stamp(store, sidecar(name)))


def file_entries(store: Store, listing: list[str]) -> list[Entry]:
    """Every file checkpoint of ``listing`` whose file is still the one its sidecar
    describes (same identity); sidecars whose file is gone are removed (the engine's)."""
    files = {p for p in listing if "/" not in p}
    out = []
    for rel in sorted(p for p in files if p.startswith(".") and p.endswith(SIDECAR_SUFFIX)):
        name = rel[1:-len(SIDECAR_SUFFIX)]
        if name not in files:
            with contextlib.suppress(CheckpointError):
                store.remove_file(rel)
                log.info("removed %s: its file %s is gone", store.url_of(rel), name)
            continue
        try:
            recorded = _sidecar_body(store, name).get("payload")["stamp"]
            if recorded and recorded != _stamp(store, name):
                log.info("%s was replaced by another writer: not one of the engine's checkpoints",
                         store.url_of(name))
                continue
            out.append(file_entry(store, name))
        except CheckpointError as exc:
            log.warning("ignoring %s: %s", store.url_of(rel), exc)
    return out


def verify_file(store: Store, name: str) -> Manifest:
    """Check file checkpoint ``name`` against its sidecar (length and crc32c); its manifest.

    Raises:
        CorruptCheckpointError: (a subclass of) the file does not match its sidecar.
    """
    m = read_file_manifest(store, name)
    row = m.files[0]
    nbytes = crc = 0
    with store.open_read(name) as f:
        while chunk := f.read(_CHUNK):
            nbytes, crc = nbytes + len(chunk), crc32c(chunk, crc)
    if nbytes != row.nbytes:
        raise ChecksumMismatchError(f"{store.url_of(name)}: {nbytes} bytes, its manifest says {row.nbytes}")
    if crc != row.crc32c:
        raise ChecksumMismatchError(f"{store.url_of(name)}: file checksum does not match")
    return m


@contextlib.contextmanager
def local_copy(url: str | os.PathLike[str], *,
               storage_options: dict[str, Any] | None = None) -> Iterator[str]:  # fmt: skip
    """A local path to the file at ``url`` (any fsspec URL; a local path as it is) for a
    framework that reads local files only (Keras's ``model.load_weights`` / ``load_model``);
    a file checkpoint (one a callback wrote) is checked against its manifest first; the copy
    goes when the block ends.

    Raises:
        CheckpointNotFoundError: nothing at ``url``.
        ChecksumMismatchError: the file does not match its manifest.

    Example:
        >>> with local_copy("s3://bucket/run1/best_model.weights.h5") as path:
        ...     model.load_weights(path)
    """
    parent, name = split_url(os.fspath(url))
    store = open_store(parent, storage_options)
    if is_file_checkpoint(store, name):
        verify_file(store, name)
    if isinstance(store, LocalStore):
        yield store.path(name)
        return
    folder = tempfile.mkdtemp(prefix="ckpt-keras-")
    try:
        with store.open_read(name) as src, open(os.path.join(folder, name), "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        yield os.path.join(folder, name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_file_checkpoint(store: Store, name: str) -> list[str]:
    """Delete file checkpoint ``name``: its sidecar first (it stops being a checkpoint),
    then the file. Returns the files left behind (none)."""
    store.remove_file(sidecar(name))
    with contextlib.suppress(CheckpointNotFoundError):
        store.remove_file(name)
    return []


def prepare(store: Store, name: str, state: Any, payload: PayloadWriter | None) -> tuple[Any, Any]:
    """What a save of ``state`` as checkpoint ``name`` writes: ``(skeleton, arrays)`` of the
    state tree, or (with a payload writer) ``(None, StagedFile)``, the file already written."""
    if payload is None:
        return flatten(resolve_state(state))
    return None, stage_file(store, name, state, payload)


def fresh_run(entries: list[Scored], protected: set[str]) -> list[Scored]:
    """``CheckpointManager(rank_existing=False)``: a new run in a directory that holds an
    earlier run's checkpoints. They stay listed and are added to ``protected`` (retention
    never deletes them), but unranked: ``best``, ``save_best_only`` and ``keep_best`` see
    this run's saves only."""
    protected |= {s.info.name for s in entries}
    return [Scored(s.entry, None) for s in entries]
