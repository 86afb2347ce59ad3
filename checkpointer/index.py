"""The index beside the checkpoints: a cache of their manifests, rebuilt when stale.

It lets a manager resume from storage alone with one listing and one small read. The
listing is the truth: names the index lists without a manifest on storage are dropped,
folders with a manifest the index does not know are read and added.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError, CheckpointNotFoundError
from .frame import decode_framed, encode_framed, refuse_timestamps
from .info import CheckpointInfo
from .manifest import MANIFEST_NAME, Manifest, read_manifest
from .owners import new_owner, release_owner
from .storage import Store

__all__ = ["Entry", "settings_key", "INDEX_NAME", "load_entries", "write_index", "write_index_quietly", "forget_index", "entry_from_manifest",
           "read_index_meta", "encode_entry", "decode_entry"]

log = logging.getLogger("checkpointer")
INDEX_NAME = ".ckpt-index.msgpack"
INDEX_MAGIC = b"CKPTIDX1"


@dataclass(frozen=True)
class Entry:
    """A committed checkpoint as the manager tracks it.

    ``confirmed``: read from its manifest (or just written), not taken from the index's
    word; only confirmed entries may be deleted. ``settings``: the writer's retention
    settings (:func:`settings_key`; ``None`` when the manifest records none).
    """

    info: CheckpointInfo
    seq: int
    managed: bool
    stamp: str = ""  # identity of the manifest file (see Store.stamp); "" when unknown
    confirmed: bool = False
    settings: str | None = None


def settings_key(recorded: Any) -> str | None:
    """A manifest's ``retention`` field as a comparable string: ``None`` when absent,
    ``"?"`` (equal to no manager's) when it is not a flat map of plain values."""
    if recorded is None:
        return None
    if not (isinstance(recorded, dict) and all(
            isinstance(k, str) and (v is None or type(v) in (int, float, str)) for k, v in recorded.items())):
        return "?"
    return json.dumps(recorded, sort_keys=True)


_SANE = 1 << 62  # steps, epochs and sequence numbers beyond this are hostile, not real


def _num(x: Any) -> int | None:
    """An int field of a manifest or index row, ``None`` when absent or out of range (a
    forged ``seq = 2**64 - 1`` must not make every later save overflow)."""
    return x if type(x) is int and -_SANE < x < _SANE else None


def entry_from_manifest(store: Store, name: str, m: Manifest, manifest_bytes: int,
                        stamp: str = "") -> Entry:
    metrics = m.get("metrics")
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))} \
        if isinstance(metrics, dict) else {}
    t = m.get("time")
    info = CheckpointInfo(
        name=name, url=store.url_of(name), step=_num(m.get("step")), epoch=_num(m.get("epoch")),
        metrics=metrics, time=float(t) if isinstance(t, (int, float)) and math.isfinite(t) else 0.0,
        nbytes=m.nbytes + manifest_bytes)
    seq = _num(m.get("seq"))
    return Entry(info, seq if seq is not None else -1, m.get("managed") is True, stamp, True,
                 settings_key(m.get("retention")))


def encode_entry(e: Entry) -> list[Any]:
    i = e.info
    return [i.name, i.step, i.epoch, i.metrics, i.time, i.nbytes, e.seq, e.managed, e.stamp]


def decode_entry(store: Store, row: Any) -> Entry | None:
    if not (isinstance(row, list) and len(row) in (8, 9) and isinstance(row[0], str)
            and isinstance(row[3], dict) and isinstance(row[4], float) and type(row[5]) is int
            and _num(row[6]) is not None):
        return None
    info = CheckpointInfo(row[0], store.url_of(row[0]), _num(row[1]), _num(row[2]),
                          dict(row[3]), row[4], row[5])
    stamp = row[8] if len(row) == 9 and isinstance(row[8], str) else ""
    return Entry(info, row[6], bool(row[7]), stamp)


def write_index(store: Store, entries: list[Entry], config: dict[str, Any] | None = None) -> None:
    """Replace the index in one write (rename locally, a single object remotely).

    ``config`` records the writer's monitor (``{"monitor": name, "mode": mode}``) so that
    ``checkpointer ls`` can mark the best checkpoint.
    """
    blob = encode_framed(INDEX_MAGIC, {"version": 1, "config": config or {},
                                           "checkpoints": [encode_entry(e) for e in entries]})
    if store.atomic_rename:
        owner = new_owner()
        tmp = f".ckpt-tmp-index-{owner}"
        try:
            # a cache: never fsynced. A crash may lose it or leave it torn; readers check
            # each row against its manifest and rebuild an index that does not decode.
            store.put_bytes(tmp, blob, durable=False)
            store.rename(tmp, INDEX_NAME)
        except BaseException:
            with contextlib.suppress(Exception):
                if store.exists(tmp):
                    store.remove_file(tmp)
            raise
        finally:
            release_owner(owner)
    else:
        store.put_bytes(INDEX_NAME, blob)


def write_index_quietly(store: Store, entries: list[Entry], config: dict[str, Any]) -> None:
    """:func:`write_index`, a failure only logged: the index is a cache, the manifests the truth."""
    try:
        write_index(store, entries, config)
    except CheckpointError as exc:
        log.warning("could not write the index: %s", exc)


def forget_index(store: Store) -> None:
    """Delete the index before a checkpoint it lists is replaced: its row for that name is
    about to go stale, and a crash (or a failed index write) after the swap must not leave
    it believed. The next manager rebuilds it from the manifests."""
    try:
        store.remove_file(INDEX_NAME)
    except CheckpointNotFoundError:
        pass
    except CheckpointError as exc:  # e.g. a folder in its place: its rows carry manifest stamps,
        # so a stale row is re-read anyway; a save must not fail for the cache's sake
        log.warning("could not delete the index %s before a replacement: %s", store.url_of(INDEX_NAME), exc)


def read_index_meta(store: Store) -> dict[str, Any]:
    """The writer's config recorded in the index (empty when there is none)."""
    try:
        data = decode_framed(store.read_bytes(INDEX_NAME), INDEX_MAGIC, store.url_of(INDEX_NAME))
    except CheckpointError:
        return {}
    config = data.get("config") if isinstance(data, dict) else None
    return {k: v for k, v in config.items() if isinstance(v, str)} if isinstance(config, dict) else {}


def _read_index(store: Store, listing: set[str]) -> dict[str, Entry]:
    if INDEX_NAME not in listing:
        return {}
    try:
        data = decode_framed(store.read_bytes(INDEX_NAME), INDEX_MAGIC, store.url_of(INDEX_NAME))
        refuse_timestamps(data, store.url_of(INDEX_NAME))  # one small row per checkpoint
        rows = data["checkpoints"] if isinstance(data, dict) else []
        entries = [e for e in (decode_entry(store, r) for r in rows) if e is not None]
    except (CheckpointError, KeyError, TypeError) as exc:
        log.warning("index %s is unreadable (%s); rebuilding it from the manifests",
                    store.url_of(INDEX_NAME), exc)
        return {}
    return {e.info.name: e for e in entries}


def _stamp(store: Store, rel: str) -> str:
    try:
        return store.stamp(rel)
    except CheckpointError:  # unknown identity: the manifest itself is read instead
        return ""


def load_entries(store: Store, listing: list[str]) -> tuple[list[Entry], bool]:
    """Committed checkpoints, oldest first, and whether the index needs rewriting."""
    files = set(listing)
    names = sorted({p.split("/", 1)[0] for p in listing
                    if p.endswith("/" + MANIFEST_NAME) and not p.startswith(".")})
    cached = _read_index(store, files)
    out, stale = [], set(cached) != set(names)
    for name in names:
        try:
            # A name can be replaced behind the index's back (another writer, a crash before
            # the index write): a row counts only while its manifest is the same file.
            stamp = _stamp(store, f"{name}/{MANIFEST_NAME}")
            if name in cached and stamp and cached[name].stamp == stamp:
                out.append(cached[name])
                continue
            stale = True
            size = store.size(f"{name}/{MANIFEST_NAME}")
            out.append(entry_from_manifest(store, name, read_manifest(store, name), size, stamp))
        except CheckpointError as exc:
            if name in cached:  # committed, now damaged: listed, so restore warns and falls back
                log.warning("%s no longer reads (%s)", store.url_of(name), exc)
                out.append(cached[name])
            else:
                log.warning("ignoring %s: %s", store.url_of(name), exc)
    out.sort(key=lambda e: (e.seq, e.info.time, e.info.name))
    return out, stale
