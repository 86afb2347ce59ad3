"""One-off saves and loads: ``checkpointer.save(url, state)`` / ``checkpointer.load(url)``."""

from __future__ import annotations

import os
import time
from typing import Any

from .commit import write_checkpoint
from .errors import CheckpointError, CheckpointNotFoundError, StateTreeError
from .hints import refuse_checkpoint
from .info import CheckpointInfo
from .load import load_checkpoint
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .naming import check_name
from .paths import join_url
from .plan import clean_metrics
from .retention import check_limit
from .storage import open_store, split_url
from .tree import flatten, resolve_state, unflatten
from .version import LIBRARY

__all__ = ["save", "load", "load_with_manifest", "read_metadata"]


def save(url: str | os.PathLike[str], state: Any, *, metadata: Any = None,
         storage_options: dict[str, Any] | None = None, step: int | None = None,
         epoch: int | None = None, metrics: dict[str, float] | None = None) -> CheckpointInfo:
    """Write ``state`` as the checkpoint folder ``url`` (replacing one already there safely).

    ``metadata`` is any tree of plain values (no arrays), stored in the manifest; ``step``,
    ``epoch`` and ``metrics`` are recorded as a manager's are (``checkpointer ls`` shows them).

    Example::

        checkpointer.save("ckpt/final", {"w": np.zeros(3)}, metadata={"lr": 0.1})
    """
    parent, name = split_url(os.fspath(url))
    check_name(name)
    refuse_checkpoint(state)
    store = open_store(parent, storage_options)
    skeleton, arrays = flatten(resolve_state(state))
    meta_skeleton = None
    if metadata is not None:
        meta_skeleton, meta_arrays = flatten(metadata)
        if meta_arrays:
            raise StateTreeError("metadata must hold plain values only, not arrays")
    now = time.time()
    check_limit("step", step)
    check_limit("epoch", epoch)
    scores = clean_metrics(metrics)
    fields: dict[str, Any] = {"step": step, "epoch": epoch, "metrics": scores, "time": now,
                              "managed": False, "seq": -1, "library": LIBRARY, "metadata": meta_skeleton}
    nbytes = write_checkpoint(store, name, skeleton, arrays, fields).nbytes
    return CheckpointInfo(name, store.url_of(name), step, epoch, scores, now, nbytes)


def load_with_manifest(url: str | os.PathLike[str], *, verify: bool = True,
                       storage_options: dict[str, Any] | None = None) -> tuple[Any, Manifest]:
    """``(state, manifest)`` of the checkpoint folder ``url``.

    Raises:
        CheckpointNotFoundError: ``url`` holds no checkpoint (the message names the
            checkpoints inside when it is a directory of them).
    """
    parent, name = split_url(os.fspath(url))
    try:
        return load_checkpoint(open_store(parent, storage_options), name, verify=verify)
    except CheckpointNotFoundError as exc:
        raise _not_a_checkpoint(os.fspath(url), storage_options, exc) from None


def _not_a_checkpoint(url: str, storage_options: dict[str, Any] | None,
                      exc: CheckpointNotFoundError) -> CheckpointNotFoundError:
    """``exc``, or when ``url`` is a directory of checkpoints an error naming them."""
    try:
        listing = open_store(url, storage_options).list_files()
    except CheckpointError:
        return exc
    names = sorted({p.split("/", 1)[0] for p in listing
                    if p.endswith("/" + MANIFEST_NAME) and not p.startswith(".")})
    if not names:
        return exc
    shown = ", ".join(names if len(names) <= 6 else [*names[:3], "...", *names[-3:]])
    return CheckpointNotFoundError(
        f"{url} is a directory of checkpoints ({len(names)}: {shown}), not one checkpoint: load "
        f"one of them, e.g. checkpointer.load({join_url(url, names[-1])!r}), or "
        f"CheckpointManager({url!r}).restore() for the latest")


def load(url: str | os.PathLike[str], *, verify: bool = True,
         storage_options: dict[str, Any] | None = None) -> Any:
    """The state tree stored in the checkpoint folder ``url``; every checksum checked unless
    ``verify=False``.

    Raises:
        CheckpointNotFoundError: ``url`` holds no checkpoint.
        CorruptCheckpointError: (a subclass of) when any byte fails its checks.
    """
    return load_with_manifest(url, verify=verify, storage_options=storage_options)[0]


def read_metadata(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Any:
    """The user metadata stored with :func:`save` (``None`` when there is none)."""
    parent, name = split_url(os.fspath(url))
    manifest = read_manifest(open_store(parent, storage_options), name)
    meta = manifest.get("metadata")
    return None if meta is None else unflatten(meta, {})
