"""Keras's own files (``.weights.h5``, ``.keras``, ``.h5``) written atomically to any fsspec URL.

Keras writes the file (``model.save_weights`` / ``model.save``) under a temporary name; the
commit then moves it into place in one step. Locally the temporary file sits beside the target,
is fsynced and ``os.replace``-d, and the folder is fsynced. On other stores Keras writes into a
local temporary folder, the bytes are uploaded under a temporary name, and one ``mv`` puts them
in place. Readers therefore see the old file or the new one, never a torn one. This module also
reads and writes the small JSON record kept beside such files (the best score and the files a
callback wrote), with the same protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import string
import tempfile
from dataclasses import dataclass
from typing import Any

from checkpointer.errors import CheckpointNotFoundError, StorageError
from checkpointer.owners import new_owner, owner_is_dead
from checkpointer.storage import LocalStore, Store, open_store

__all__ = [
    "KERAS_SUFFIXES",
    "is_keras_file",
    "split_path",
    "stage_model_file",
    "StagedFile",
    "read_json",
    "write_json",
    "remove",
    "exists",
    "cleanup_leftovers",
]

KERAS_SUFFIXES = (".weights.h5", ".keras", ".h5")
_CHUNK = 8 << 20
# Temporary names carry this process's owner token, so that a later run can tell the
# leftovers of a dead writer (removed by cleanup_leftovers) from a live one's.
_OWNER = new_owner()
_TMP_TAIL = r"\.tmp-(?P<owner>[A-Za-z0-9]+\.\d+\.[0-9a-f]+)-[0-9a-f]+"


def _tmp_name(name: str, suffix: str = "") -> str:
    return f".{name}.tmp-{_OWNER}-{secrets.token_hex(4)}{suffix}"


def is_keras_file(path: str) -> bool:
    """Whether ``path`` names a file in one of Keras's own formats."""
    return path.endswith(KERAS_SUFFIXES)


def _suffix(name: str) -> str:
    return next(s for s in KERAS_SUFFIXES if name.endswith(s))


def split_path(url: str) -> tuple[str, str]:
    """``(parent, name)`` of a local path or fsspec URL (``memory://x.keras`` included)."""
    text = os.fspath(url)
    protocol, sep, rest = text.rpartition("://")
    if not sep:
        parent, _, name = text.rpartition(os.sep if os.sep in text else "/")
        return (parent or "."), name
    parent, _, name = rest.rpartition("/")
    return f"{protocol}://{parent}", name


def _store(parent: str, storage_options: dict[str, Any] | None) -> Store:
    store = open_store(parent, storage_options)
    store.makedirs("")
    return store


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StagedFile:
    """A complete file under a temporary name, waiting for :meth:`commit`."""

    url: str
    store: Store
    name: str
    local: str  # the bytes on local disk (beside the target when the store is local)
    local_dir: str | None = None  # a temporary folder to remove afterwards

    def commit(self) -> None:
        """Move the file into place in one step; the temporary copy is gone afterwards."""
        try:
            if isinstance(self.store, LocalStore):
                _fsync_file(self.local)
                try:
                    os.replace(self.local, self.store.path(self.name))
                except OSError as exc:
                    raise StorageError(f"moving {self.local} to {self.url} failed: {exc}") from exc
                self.store.fsync_dir("")
            else:
                tmp = _tmp_name(self.name)
                try:
                    with self.store.writer(tmp) as w, open(self.local, "rb") as f:
                        while chunk := f.read(_CHUNK):
                            w.write(chunk)
                    self.store.rename(tmp, self.name)
                except BaseException:
                    with contextlib.suppress(Exception):
                        if self.store.exists(tmp):
                            self.store.remove_file(tmp)
                    raise
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary copy (idempotent)."""
        with contextlib.suppress(OSError):
            if os.path.exists(self.local):
                os.unlink(self.local)
        if self.local_dir:
            shutil.rmtree(self.local_dir, ignore_errors=True)
            self.local_dir = None


def stage_model_file(
    model: Any, url: str, *, weights_only: bool, storage_options: dict[str, Any] | None = None
) -> StagedFile:
    """Have Keras write ``model`` to a temporary file destined for ``url``.

    ``model.save_weights`` when ``weights_only`` else ``model.save``: the bytes are exactly
    what Keras would write at ``url``. Nothing is visible at ``url`` until ``commit()``.
    """
    parent, name = split_path(url)
    store = _store(parent, storage_options)
    suffix = _suffix(name)
    local_dir = None
    if isinstance(store, LocalStore):
        local = store.path(_tmp_name(name, suffix))
    else:
        local_dir = tempfile.mkdtemp(prefix="ckpt-keras-")
        local = os.path.join(local_dir, "staged" + suffix)
    staged = StagedFile(url, store, name, local, local_dir)
    try:
        if weights_only:
            model.save_weights(local, overwrite=True)
        else:
            model.save(local, overwrite=True)
    except BaseException:
        staged.abort()
        raise
    return staged


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The JSON document at ``url``, or ``None`` when there is none or it is unreadable."""
    parent, name = split_path(url)
    try:
        store = open_store(parent, storage_options)
        if not store.exists(name):
            return None
        return json.loads(store.read_bytes(name).decode("utf-8"))
    except (CheckpointNotFoundError, ValueError, UnicodeDecodeError):
        return None


def write_json(url: str, document: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``document`` as JSON at ``url`` atomically (temporary name, then one move)."""
    parent, name = split_path(url)
    store = _store(parent, storage_options)
    data = json.dumps(document, indent=1, allow_nan=False).encode("utf-8")
    tmp = _tmp_name(name)
    try:
        store.put_bytes(tmp, data)  # fsynced on local disk
        store.rename(tmp, name)  # os.rename locally (atomic, replaces), one mv elsewhere
        store.fsync_dir("")
    except BaseException:
        with contextlib.suppress(Exception):
            if store.exists(tmp):
                store.remove_file(tmp)
        raise


def remove(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete the file at ``url``; ``False`` when it was not there."""
    parent, name = split_path(url)
    store = open_store(parent, storage_options)
    if not store.exists(name):
        return False
    store.remove_file(name)
    return True


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a file exists at ``url``."""
    parent, name = split_path(url)
    try:
        return open_store(parent, storage_options).exists(name)
    except CheckpointNotFoundError:
        return False


def cleanup_leftovers(
    template: str, extra_suffix: str = "", storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Remove temporary files that dead writers left for names matching ``template``
    (its ``{fields}`` match anything; ``extra_suffix`` names a companion file too).

    Only files named by this module's temporary-name scheme whose owner process is gone
    (on this host) are removed; returns their names.
    """
    parent, name = split_path(template)
    if "{" in parent:
        return []
    try:
        parts = list(string.Formatter().parse(name))
    except ValueError:
        return []
    name_re = "".join(
        re.escape(lit) + (".*" if field is not None else "") for lit, field, *_ in parts
    )
    pattern = re.compile(rf"^\.{name_re}(?:{re.escape(extra_suffix)})?{_TMP_TAIL}")
    try:
        store = open_store(parent, storage_options)
        listing = store.list_files()
    except CheckpointNotFoundError:
        return []
    removed = []
    for rel in listing:
        m = pattern.match(rel)
        if "/" not in rel and m and owner_is_dead(m["owner"]):
            store.remove_file(rel)
            removed.append(rel)
    return removed
