"""Deleting a checkpoint folder so that a crash midway never leaves a manifest naming
deleted data, and never deleting a file the engine did not write."""

from __future__ import annotations

import logging
import re
from functools import partial

from . import reaper
from .errors import CheckpointError
from .manifest import MANIFEST_NAME, read_manifest
from .owners import OWNER_PATTERN, new_owner, release_owner
from .payload import is_file_checkpoint, remove_file_checkpoint
from .storage import Store

__all__ = ["remove_checkpoint", "TMP_PREFIX", "OLD_PREFIX", "DATA_RE"]

log = logging.getLogger("checkpointer")
TMP_PREFIX = ".ckpt-tmp-"
OLD_PREFIX = ".ckpt-old-"
DATA_RE = re.compile(  # the data files the engine writes, and their writer
    rf"^data-(?:(?P<owner>{OWNER_PATTERN})-)?(?:r\d{{5}}-)?\d{{5}}\.safetensors$")


def remove_checkpoint(store: Store, name: str, *, background: bool = False) -> list[str]:
    """Delete checkpoint (or leftover) folder ``name`` so that a crash midway never leaves a
    manifest naming deleted data; returns the files left behind (not the engine's).

    The files the manifest names are the engine's; anything else in the folder is a user's
    and stays: then the manifest goes first (the folder stops being a checkpoint), then the
    data files, and the folder is left with the user's files. A folder holding only the
    engine's files is renamed aside first where rename is atomic (a crash leaves a
    temporary folder that cleanup finishes), else emptied manifest first. ``background``:
    the renamed-aside folder's files are deleted on :mod:`checkpointer.reaper`'s thread
    (the checkpoint is gone when this returns; its space comes back a little later).
    """
    if name.startswith(".") or "/" in name:  # a leftover of the engine's own
        store.remove_tree(name)
        return []
    if is_file_checkpoint(store, name):  # one file and its sidecar (checkpointer.payload)
        return remove_file_checkpoint(store, name)
    ours, theirs = _split_folder(store, name)
    if theirs:
        for rel in [MANIFEST_NAME, *sorted(ours - {MANIFEST_NAME})]:
            if rel in ours:
                store.remove_file(f"{name}/{rel}")
        log.warning("deleted checkpoint %s but left files the engine did not write: %s",
                    store.url_of(name), ", ".join(sorted(theirs)))
        return sorted(theirs)
    if store.atomic_rename:
        owner = new_owner()  # live until the delete ends: no cleanup races it
        gone = f"{TMP_PREFIX}{name}-{owner}"
        try:
            store.rename(name, gone)
        except BaseException:
            release_owner(owner)
            raise
        finish = partial(_finish_delete, store, gone, owner)
        if background:
            reaper.later(finish)
        else:
            finish()
        return []
    if MANIFEST_NAME in ours:
        store.remove_file(f"{name}/{MANIFEST_NAME}")
    store.remove_tree(name)
    return []


def _finish_delete(store: Store, gone: str, owner: str) -> None:
    try:
        store.remove_tree(gone)
    except CheckpointError as exc:  # the checkpoint is gone already; cleanup retries
        log.warning("could not finish deleting %s: %s", store.url_of(gone), exc)
    finally:
        release_owner(owner)


def _split_folder(store: Store, name: str) -> tuple[set[str], set[str]]:
    """The files of folder ``name``: the engine's (the manifest and what it names, or data
    files by their name when the manifest is unreadable) and the others."""
    files = set(store.list_folder(name))
    try:
        ours = {MANIFEST_NAME} | {f.name for f in read_manifest(store, name).files}
    except CheckpointError:
        ours = {MANIFEST_NAME} | {f for f in files if DATA_RE.match(f)}
    return files & ours, files - ours
