"""The commit protocol: how a checkpoint reaches storage so that it is whole or absent.

Stores with atomic rename (local disk): data files and the manifest are written and
fsynced in a temporary folder ``.ckpt-tmp-<name>-<owner>``, the folder is fsynced and
renamed into place, then the parent folder is fsynced. Replacing a name first moves the
old folder aside to ``.ckpt-old-<name>-<owner>``; startup cleanup finishes or undoes an
interrupted swap. Object stores: data objects ``data-<owner>-NNNNN.safetensors`` are
written into the checkpoint folder, then the manifest as one object (the commit point),
then the old data objects that the new manifest no longer names are deleted. Readers
ignore folders without a valid manifest. An ``owner`` is ``host.pid.random``: cleanup
removes only leftovers of owners that are provably dead (this host, process gone).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from . import format as fmt
from . import reaper
from .errors import CheckpointError, CheckpointNotFoundError, StorageError
from .gcpause import without_gc
from .index import forget_index
from .limits import HEADER_BUDGET, check_manifest_size, check_writable, header_bytes
from .manifest import (
    MANIFEST_NAME,
    FileRow,
    Manifest,
    Piece,
    ShardRow,
    TensorRow,
    merge_pieces,
    read_manifest,
)
from .owners import is_owner, new_owner, owner_is_dead, release_owner
from .removal import DATA_RE, OLD_PREFIX, TMP_PREFIX, remove_checkpoint
from .sharding import split_pieces
from .storage import Store

__all__ = ["write_checkpoint", "commit_copy", "Produce", "write_rank_files", "remove_checkpoint", "cleanup", "Committed",
           "Participants", "TMP_PREFIX", "OLD_PREFIX", "DEFAULT_MAX_FILE_BYTES"]

log = logging.getLogger("checkpointer")
DEFAULT_MAX_FILE_BYTES = 4 << 30


def _plan(arrays: Sequence[tuple[str, np.ndarray]], max_file_bytes: int) -> list[list[tuple[str, np.ndarray]]]:
    """The data files: a new one when the bytes pass ``max_file_bytes`` or the header
    would near the readers' cap."""
    groups: list[list[tuple[str, np.ndarray]]] = [[]]
    size = head = 0
    for key, arr in arrays:
        entry = header_bytes(key, arr.shape)
        if groups[-1] and (size + arr.nbytes > max_file_bytes or head + entry > HEADER_BUDGET):
            groups.append([])
            size = head = 0
        groups[-1].append((key, arr))
        size += arr.nbytes
        head += entry
    return groups


class Committed(NamedTuple):
    """What a commit reports: bytes on storage and the manifest's identity."""

    nbytes: int
    stamp: str


@without_gc
def write_checkpoint(
    store: Store, name: str, skeleton: Any, arrays: Sequence[tuple[str, Any]],
    fields: dict[str, Any], *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    participants: Participants | None = None,
) -> Committed:
    """Write and commit checkpoint ``name``; returns its size in bytes and the identity of
    its manifest file (see :meth:`Store.stamp`; "" when the store cannot tell).

    ``fields`` are the manifest's own entries (step, epoch, metrics, time, metadata, ...).
    ``arrays`` may hold :class:`~checkpointer.sharding.ShardedArray` values; with
    ``participants`` (other ranks writing their pieces into the same checkpoint) the
    manifest is written only after every rank's files are durable. On any error nothing
    becomes visible under ``name`` and an earlier checkpoint of that name is left intact.
    """
    plain, pieces, meta = split_pieces(arrays, primary=True)
    check_writable(store.url_of(name), skeleton, plain + pieces, meta, fields)
    return _commit(store, name, _Work(skeleton, plain + pieces, meta, fields, max_file_bytes,
                                      participants, frozenset(k for k, _ in pieces)))


def commit_copy(store: Store, name: str, manifest: Manifest, produce: Produce) -> Committed:
    """Commit checkpoint ``name`` whose data files ``produce(store, folder, prefix)`` writes
    (copies of ``manifest``'s files, returning their rows), with ``manifest``'s tree, shards
    and fields: the same protocol as :func:`write_checkpoint`."""
    return _commit(store, name, _Work(manifest.tree, [], [], dict(manifest.fields), DEFAULT_MAX_FILE_BYTES,
                                      None, frozenset(), produce, manifest.shards))


def _commit(store: Store, name: str, work: _Work) -> Committed:
    try:
        return _commit_once(store, name, work)
    except (StorageError, OSError) as exc:  # a sink's own write raises the OSError
        # Out of space while retention's deletes still run (checkpointer.reaper): the space
        # they free is what a save with keep_last / keep_best counts on. Wait, then retry
        # once (alone only: the other ranks of a save would not retry with it).
        if work.participants is not None or not (_out_of_space(exc) and reaper.pending()):
            raise
    log.info("out of space with deletes still running: waiting for them, then saving %s again", name)
    reaper.wait_removals()
    return _commit_once(store, name, work)


def _out_of_space(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _commit_once(store: Store, name: str, work: _Work) -> Committed:
    owner = new_owner()
    try:
        write = _write_renaming if store.atomic_rename else _write_object_store
        return write(store, name, work, owner)
    finally:
        release_owner(owner)


class Participants(Protocol):
    """Other ranks taking part in one save (see :mod:`checkpointer.collective`).

    Call order: ``staged`` once the staging folder exists (before this rank writes),
    ``collect`` after this rank's files are durable and before the manifest is written.
    """

    def staged(self, folder: str, prefix: str) -> None: ...

    def collect(self, files: list[FileRow], tensors: list[TensorRow], pieces: list[Piece]
                ) -> tuple[list[FileRow], list[TensorRow], list[Piece]]: ...


Produce = Callable[[Store, str, str], tuple[list[FileRow], list[TensorRow]]]


@dataclass(frozen=True)
class _Work:
    skeleton: Any
    arrays: list[tuple[str, np.ndarray]]
    pieces: list[Piece]
    fields: dict[str, Any]
    max_file_bytes: int
    participants: Participants | None
    piece_keys: frozenset[str]
    produce: Produce | None = None  # writes the data files instead of ``arrays`` (a copy)
    shards: tuple[ShardRow, ...] | None = None  # a copy's, already merged


def write_rank_files(store: Store, folder: str, prefix: str, arrays: Sequence[tuple[str, np.ndarray]],
                     max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, *, pieces: Container[str] | None = None,
                     ) -> tuple[list[FileRow], list[TensorRow]]:
    """Write (and make durable) one rank's data files into a staging ``folder``.

    ``pieces``: the keys that are pieces of sharded arrays (all of them when ``None``);
    they get per-block checksums, for readers that need only part of a piece.
    """
    files, tensors = [], []
    for i, group in enumerate(_plan(arrays, max_file_bytes)):
        if not group and i > 0:
            continue
        fname = f"{prefix}{i:05d}.safetensors"
        blocked = [k for k, _ in group] if pieces is None else pieces
        with store.writer(f"{folder}/{fname}", sum(a.nbytes for _, a in group)) as w:
            frec, trecs = fmt.write_safetensors(w, fname, group, blocked=blocked)
        files.append(frec)
        tensors += trecs
    return files, tensors


def _write_files(store: Store, folder: str, prefix: str, work: _Work) -> tuple[Committed, list[str]]:
    """This rank's data files, the other ranks' (through ``participants``), then the
    manifest: what was committed and the data files written."""
    if work.participants is not None:
        work.participants.staged(folder, prefix)
    if work.produce is not None:
        files, tensors = work.produce(store, folder, prefix)
    else:
        files, tensors = write_rank_files(store, folder, prefix, work.arrays, work.max_file_bytes,
                                          pieces=work.piece_keys)
    pieces = work.pieces
    if work.participants is not None:
        files, tensors, pieces = work.participants.collect(files, tensors, pieces)
    shards = work.shards if work.shards is not None else (
        merge_pieces(pieces, store.url_of(folder)) if pieces else ())
    blob = Manifest(work.skeleton, tuple(files), tuple(tensors), shards, fmt.BLOCK_BYTES, work.fields).encode()
    check_manifest_size(store.url_of(folder), blob)
    # One put: on object stores the manifest object is the commit point and must appear
    # whole or not at all (a streamed write may show a partial or empty object midway).
    store.put_bytes(f"{folder}/{MANIFEST_NAME}", blob)
    # The manifest's identity for the index, taken before the commit makes it visible
    # (a rename keeps inode and mtime), so it is ours even if another writer replaces the
    # name right after; on object stores it is taken right after the put.
    stamp = ""
    with contextlib.suppress(CheckpointError):
        stamp = store.stamp(f"{folder}/{MANIFEST_NAME}")
    return Committed(sum(f.nbytes for f in files) + len(blob), stamp), [f.name for f in files]


def _write_renaming(store: Store, name: str, work: _Work, owner: str) -> Committed:
    tmp = f"{TMP_PREFIX}{name}-{owner}"
    old, placed = None, False
    if store.exists(name) and not store.exists(f"{name}/{MANIFEST_NAME}"):
        # Not a checkpoint (a user's file or folder): replacing it would delete what we did not write.
        raise StorageError(f"{store.url_of(name)} exists and is not a checkpoint; refusing to replace it")
    store.makedirs("")
    store.makedirs(tmp)
    try:
        committed, _ = _write_files(store, tmp, "data-", work)
        store.fsync_dir(tmp)
        if store.exists(name):
            forget_index(store)
            old = f"{OLD_PREFIX}{name}-{owner}"
            store.rename(name, old)
        store.rename(tmp, name)
        placed = True
        store.fsync_dir("")  # the commit point: after it, the save has succeeded
        placed = False
    except BaseException:
        # Undo: a failed save must never show, and the checkpoint it replaced must come back.
        with contextlib.suppress(Exception):
            if placed:
                store.rename(name, tmp)
            if old is not None and not store.exists(name):
                store.rename(old, name)
            if store.exists(tmp):
                remove_checkpoint(store, tmp)
        raise
    if old is not None:
        with contextlib.suppress(CheckpointError):
            remove_checkpoint(store, old)
            store.fsync_dir("")
    return committed


def _folder_files(store: Store, name: str) -> list[str]:
    try:
        return store.list_folder(name)
    except CheckpointNotFoundError:
        return []


def _write_object_store(store: Store, name: str, work: _Work, owner: str) -> Committed:
    before = set(_folder_files(store, name))  # one listing of this name, not of the root
    written: list[str] = []
    foreign = any(not DATA_RE.match(b) for b in before)  # a file of that name lists as itself
    if MANIFEST_NAME not in before and foreign:
        raise StorageError(f"{store.url_of(name)} exists and is not a checkpoint: not writing into it")
    prior: set[str] = set()  # the data the replaced manifest names: ours to delete after
    if MANIFEST_NAME in before:
        forget_index(store)
        with contextlib.suppress(CheckpointError):
            prior = {f.name for f in read_manifest(store, name).files}
    try:
        committed, written = _write_files(store, name, f"data-{owner}-", work)
    except BaseException:
        with contextlib.suppress(Exception):
            for f in _folder_files(store, name):
                if f.startswith(f"data-{owner}-"):
                    store.remove_file(f"{name}/{f}")
        raise
    for old in before - set(written) - {MANIFEST_NAME}:
        # Never the objects of a live concurrent writer of this name: its manifest may
        # still come and name them. Those of the replaced manifest and of dead writers go.
        m = DATA_RE.match(old)
        if m and (old in prior or (m["owner"] and owner_is_dead(m["owner"]))):
            with contextlib.suppress(CheckpointError):
                store.remove_file(f"{name}/{old}")
    return committed


def _owner_of(entry: str, prefix: str) -> tuple[str, str] | None:
    """``(name, owner)`` of a ``<prefix><name>-<owner>`` leftover."""
    body = entry[len(prefix):]
    name, _, owner = body.rpartition("-")
    return (name, owner) if name and is_owner(owner) else None


def cleanup(store: Store, listing: Sequence[str] | None = None) -> list[str]:
    """Remove the engine's own unfinished leftovers whose writer is dead; return what went.

    Finishes or undoes an interrupted replacement (``.ckpt-old-*``), deletes temporary
    folders and orphaned data objects. Never touches anything it did not write, nor the
    leftovers of a writer that may still be running.
    """
    files = list(store.list_files() if listing is None else listing)
    top = {p.split("/", 1)[0] for p in files}
    removed: list[str] = []
    for entry in sorted(top):
        try:
            removed += _clean_leftover(store, entry, files)
        except CheckpointError as exc:  # one undeletable leftover must not lock the directory
            log.warning("could not clean up %s (left in place): %s", store.url_of(entry), exc)
    if not store.atomic_rename:
        with contextlib.suppress(CheckpointError):  # e.g. not permitted: not worth failing for
            removed += _cleanup_objects(store, files)
        with contextlib.suppress(CheckpointError):
            removed += _abort_uploads(store)
    return removed


def _clean_leftover(store: Store, entry: str, files: Sequence[str]) -> list[str]:
    """Finish or undo ``entry`` when it is a leftover of a dead writer; what went."""
    for prefix in (OLD_PREFIX, TMP_PREFIX):
        parsed = _owner_of(entry, prefix) if entry.startswith(prefix) else None
        if parsed is None or not owner_is_dead(parsed[1]):
            continue
        name = parsed[0]
        if prefix == OLD_PREFIX and f"{name}/{MANIFEST_NAME}" not in files:
            store.rename(entry, name)  # the replacement never landed: the old one comes back
        elif entry + "/" in files or prefix == OLD_PREFIX:
            store.remove_tree(entry)
        else:
            store.remove_file(entry)
        return [entry]
    return []


def _abort_uploads(store: Store) -> list[str]:
    """Abort unfinished multipart uploads of data objects whose writer is dead."""
    removed = []
    for rel, upload_id in store.unfinished_uploads():
        m = DATA_RE.match(rel.rpartition("/")[2])
        if m and m["owner"] and owner_is_dead(m["owner"]):
            store.abort_upload(rel, upload_id)
            removed.append(f"{rel} (unfinished upload)")
    return removed


def _cleanup_objects(store: Store, files: Sequence[str]) -> list[str]:
    removed: list[str] = []
    folders: dict[str, list[str]] = {}
    for p in files:
        if "/" in p and not p.endswith("/"):
            folder, base = p.split("/", 1)
            folders.setdefault(folder, []).append(base)
    for folder, bases in folders.items():
        if folder.startswith("."):
            continue
        ours = [b for b in bases if (m := DATA_RE.match(b)) and m["owner"] and owner_is_dead(m["owner"])]
        if not ours:
            continue
        if MANIFEST_NAME in bases:
            try:
                referenced = {f.name for f in read_manifest(store, folder).files}
            except CheckpointError:
                continue  # a broken manifest: leave the evidence alone
            ours = [b for b in ours if b not in referenced]
        for b in ours:
            store.remove_file(f"{folder}/{b}")
            removed.append(f"{folder}/{b}")
    return removed
