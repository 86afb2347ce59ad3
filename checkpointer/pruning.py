"""Retention carried out on storage: the policy's decision, checked against the manifests.

The index is a cache for listing speed, never a reason to delete: before a policy
deletes anything, every checkpoint known only from the index is confirmed by reading its
manifest (what it records replaces the index's row). A checkpoint whose manifest does not
read is kept. Only checkpoints the engine's manager wrote (``managed``) under the same
retention settings (the ``retention`` field of each manifest) can go: a manager never
deletes what a manager with other settings wrote, nor a one-off ``checkpointer.save``.
Manifests written before settings were recorded count as written with the same ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

from .commit import remove_checkpoint
from .errors import CheckpointError
from .index import Entry, entry_from_manifest
from .manifest import MANIFEST_NAME, read_manifest
from .monitor import Monitor
from .plan import Scored
from .retention import Record, Retention
from .storage import Store

__all__ = ["recorded_settings", "records", "confirm", "explain", "prune"]

log = logging.getLogger("checkpointer")


def recorded_settings(monitor: Monitor | None, retention: Retention) -> dict[str, Any]:
    """What a manager records in each manifest it writes (its ``retention`` field)."""
    return {"monitor": None if monitor is None else monitor.metric,
            "mode": None if monitor is None else monitor.mode, **retention.settings()}


def _key(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)


def records(entries: Sequence[Scored], settings: dict[str, Any]) -> list[Record]:
    """What the policy sees: an unconfirmed entry (the index's word) is never deletable."""
    key = _key(settings)
    return [Record(s.info.name, s.entry.seq, s.score, s.entry.managed and s.entry.confirmed,
                   s.info.step, s.info.epoch, s.info.time,
                   s.entry.settings is None or s.entry.settings == key) for s in entries]


def confirm(store: Store, entries: Sequence[Scored], score: Callable[[Entry], Scored]) -> list[Scored]:
    """``entries`` with every row the index gave replaced by what its manifest records
    (scored by ``score``), oldest first; a manifest that does not read makes its row
    one retention never deletes (it stays listed)."""
    out = []
    for s in entries:
        if s.entry.confirmed:
            out.append(s)
            continue
        name = s.info.name
        try:
            rel = f"{name}/{MANIFEST_NAME}"
            manifest, size = read_manifest(store, name), store.size(rel)
            stamp = s.entry.stamp
            try:
                stamp = store.stamp(rel)
            except CheckpointError:
                pass
            entry = entry_from_manifest(store, name, manifest, size, stamp)
            # scored again only when the manifest's metrics differ from the index's row
            out.append(Scored(entry, s.score) if entry.info.metrics == s.info.metrics else score(entry))
        except CheckpointError as exc:  # settled once: kept, never deleted
            log.warning("%s does not read (%s): kept, not deleted", store.url_of(name), exc)
            out.append(Scored(replace(s.entry, confirmed=True, managed=False), s.score))
    out.sort(key=lambda s: (s.entry.seq, s.info.time, s.info.name))
    return out


def explain(retention: Retention, monitor: Monitor | None, entries: Sequence[Scored],
            protected: Collection[str], settings: dict[str, Any]) -> dict[str, list[str]]:
    """Name -> every reason ``retention`` keeps it (empty: it would be deleted)."""
    return retention.explain(records(entries, settings), monitor, protected)


def prune(store: Store, retention: Retention, monitor: Monitor | None, entries: Sequence[Scored],
          protected: Collection[str], settings: dict[str, Any],
          score: Callable[[Entry], Scored]) -> list[Scored]:
    """Delete what ``retention`` does not keep; the entries left (confirmed where the
    policy deletes anything). A failed delete is a warning and the entry stays listed."""
    if not retention.deletes:
        return list(entries)
    if any(not s.entry.confirmed for s in entries):  # once per manager: the index's rows
        entries = confirm(store, entries, score)
    left = list(entries)
    for name in retention.to_delete(records(entries, settings), monitor, protected):
        try:
            remove_checkpoint(store, name, background=True)
        except CheckpointError as exc:
            log.warning("could not delete %s: %s", store.url_of(name), exc)
            continue
        left = [s for s in left if s.info.name != name]
        log.info("deleted %s (outside keep_last=%s / keep_best=%s)", store.url_of(name),
                 retention.keep_last, retention.keep_best)
    return left
