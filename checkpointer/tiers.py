"""The replica tier (DESIGN section 13): committed local checkpoints copied, in the
background, to a second directory (any store, usually an object store) that a new machine
resumes from.

:class:`Replica` owns the replica's store, its checkpoints (as the local tier's: listed,
cleaned of dead writers' leftovers, scored once), one copy thread (which hands copies to a
remote store to a niced child process of its own, :mod:`checkpointer.replica_process`, so
that the copy's Python work does not hold this process's GIL) and the replica's retention;
:class:`Tiers` is what the manager calls (a no-op without a replica). Call order, as the
manager uses it:

1. :meth:`Replica.open` (rank 0, at construction): clean up, list (a replica that does not
   list is a warning, listed again before the next copy), and queue a copy of the newest
   local checkpoint when the replica holds nothing as new (the catch-up after a crash);
2. :meth:`Replica.committed` after each local commit, before local retention (from the
   save's thread: the training thread, or the async writer's): every ``every``-th
   checkpoint by commit sequence number (so a resumed run keeps the rhythm) and every
   preemption save is queued. One copy runs at a time and at most one waits: a newer due
   checkpoint replaces the one waiting (the newest wins, so the replica never falls more
   than one copy behind however slow it is). Each copy streams and verifies through
   :func:`~checkpointer.replica.copy_with_manifest` and commits with the commit protocol
   (never visible half-copied); then the replica's retention runs there and its index is
   rewritten;
3. :attr:`Replica.busy` while local retention runs: the checkpoint being copied, the one
   waiting and the newest due one that has not reached the replica are never deleted
   locally (``keep_last=1`` with a slow or failing replica keeps two);
4. :meth:`Replica.wait` / :meth:`Replica.close`: the only calls that wait for copies (the
   copy thread is a ``concurrent.futures`` worker, which the interpreter joins at exit).

A failed copy (network down, bucket full) is a warning (logged and a
:class:`~checkpointer.plan.CheckpointWarning`); the next replication copies the newest due
checkpoint. :meth:`Replica.close` retries the newest due one once more, then raises
:class:`~checkpointer.errors.StorageError` naming it if it never reached the replica.

Replica retention deletes only copies written under the local manager's retention settings
(a copy carries the local manifest's fields unchanged, its ``retention`` field included),
so another run's checkpoints there, or one-off saves, are never deleted.

The manager's view (:meth:`Tiers.view`) is both tiers: one entry per name, the local one when
both hold the same checkpoint (the newer by commit sequence when the name holds different
ones); ``info.url`` says which tier it is read from. Several processes: rank 0 copies and
sends its view of both tiers to the other ranks (:meth:`Tiers.encode`), so every rank
restores from the same tier.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from . import commit, pruning
from .distributed import Coordinator, run_on_primary
from .errors import CheckpointError, CheckpointNotFoundError, ConfigurationError, StorageError
from .index import Entry, entry_from_manifest, load_entries, write_index_quietly
from .info import Checkpoint, CheckpointInfo
from .monitor import Monitor
from .payload import file_entries
from .plan import CheckpointWarning, Scored, decode_scored, encode_scored, kept_index_config
from .reaper import wait_removals
from .replica_process import Copier
from .restoring import load_first
from .retention import Retention, check_limit
from .sharding import ShardSpec
from .storage import Store, open_store

__all__ = ["Replica", "Tiers", "open_tiers", "open_tier"]

log = logging.getLogger("checkpointer")


@dataclass(frozen=True)
class _Copy:
    """One queued copy: the local checkpoint and the names replica retention keeps."""

    source: Store
    scored: Scored
    protected: frozenset[str]

    @property
    def key(self) -> tuple[str, int]:
        return self.scored.info.name, self.scored.entry.seq


def open_tiers(local: Store, url: str | os.PathLike[str] | None, storage_options: dict[str, Any] | None,
               every: Any, keep_last: int | None, keep_best: int | None, *, retention: Retention,
               monitor: Monitor | None, settings: dict[str, Any], score: Callable[[Entry], Scored]) -> Tiers:
    """A manager's tiers: ``local`` and the replica at ``url`` (none when ``None``), its
    options validated, its retention the local ``retention`` with ``keep_last`` /
    ``keep_best`` replaced where given. ``settings``: the local manager's recorded ones.

    Raises:
        ConfigurationError: a bad ``every`` or limit, ``keep_best`` without a monitor, a
            replica option without a replica, or the replica being the local directory.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigurationError(f"replica_every must be a positive int, got {every!r}")
    check_limit("replica_keep_last", keep_last)
    check_limit("replica_keep_best", keep_best)
    if url is None:
        given = [n for n, v in (("replica_every", every != 1), ("replica_keep_last", keep_last is not None),
                                ("replica_keep_best", keep_best is not None),
                                ("replica_storage_options", storage_options is not None)) if v]
        if given:
            raise ConfigurationError(f"{', '.join(given)} given without replica=URL (the replica's directory)")
        return Tiers(local, None)
    if keep_best and monitor is None:
        raise ConfigurationError("replica_keep_best needs a monitor (a metric name to rank by)")
    store = open_store(url, storage_options)
    if store.url.rstrip("/") == local.url.rstrip("/"):
        raise ConfigurationError(f"replica={os.fspath(url)!r} is the manager's own directory: pass another one")
    kept = replace(retention, keep_last=retention.keep_last if keep_last is None else keep_last,
                   keep_best=retention.keep_best if keep_best is None else keep_best)
    return Tiers(local, Replica(store, every, kept, monitor, settings, score))


def open_tier(store: Store, monitor: Monitor | None, score: Callable[[Entry], Scored], where: str = ""
              ) -> tuple[list[Scored], bool, dict[str, str]]:
    """List a tier once: clean up the engine's dead leftovers, load the index (its rows
    checked against the listing) and score each checkpoint once. Returns the checkpoints,
    oldest first, whether the index needs rewriting, and the monitor the index records
    (for a manager without one: see :func:`~checkpointer.plan.kept_index_config`)."""
    listing = store.list_files()
    removed = commit.cleanup(store, listing)
    if removed:
        log.info("removed unfinished leftovers of dead writers%s: %s", where, ", ".join(removed))
        listing = store.list_files()
    config = kept_index_config(store, listing, monitor)
    entries, stale = load_entries(store, listing)
    files = file_entries(store, listing)  # a payload writer's (checkpointer.payload): the index may not list them
    entries = sorted(entries + files, key=lambda e: (e.seq, e.info.time, e.info.name)) if files else entries
    return [score(e) for e in entries], stale or bool(files), config


def _ordered(entries: list[Scored]) -> list[Scored]:
    return sorted(entries, key=lambda s: (s.entry.seq, s.info.time, s.info.name))


class Replica:
    """The replica tier of one manager: see the module docstring for the call order.

    ``entries``: the replica's committed checkpoints, oldest first (replaced, never
    mutated; on ranks other than 0, rank 0's list as it last sent it).
    """

    def __init__(self, store: Store, every: int, retention: Retention, monitor: Monitor | None,
                 settings: dict[str, Any], score: Callable[[Entry], Scored]) -> None:
        self.store, self.every, self.retention = store, every, retention
        self._monitor, self._settings, self._score = monitor, settings, score
        self.entries: list[Scored] = []
        self._config: dict[str, str] = {}
        self._listed = False
        self._cond = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        self._queued: _Copy | None = None
        self._running: _Copy | None = None
        self._draining = False
        self._due: _Copy | None = None  # the newest checkpoint that should reach the replica
        self._reached = True
        self._error: BaseException | None = None
        self._copier = Copier()

    # -- rank 0: open, queue, copy -------------------------------------------------------

    def open(self, source: Store, local: Sequence[Scored], protected: Collection[str]) -> None:
        """List the replica (a failure is a warning: listed again before the next copy) and
        queue a copy of the newest local checkpoint when the replica lacks it."""
        try:
            self._list()
        except CheckpointError as exc:
            self._warn(f"replica {self.store.url} does not list ({exc}): only the local tier is "
                       "seen; listed again at the next replication")
        newest = local[-1] if local else None
        entries = self.entries
        if newest is not None and all(s.entry.seq < newest.entry.seq for s in entries):
            log.info("catching up: %s is not in the replica %s yet", newest.info.name, self.store.url)
            self._queue(_Copy(source, newest, frozenset(protected)))

    def committed(self, source: Store, scored: Scored, forced: bool, protected: Collection[str]) -> None:
        """A local commit: queue its copy when it is due (``forced``: a preemption save)."""
        if forced or (scored.entry.seq + 1) % self.every == 0:
            self._queue(_Copy(source, scored, frozenset(protected)))

    @property
    def busy(self) -> frozenset[str]:
        """Names local retention must keep: being copied, waiting, or due and not there yet."""
        with self._cond:
            jobs = [self._running, self._queued, None if self._reached else self._due]
        return frozenset(j.scored.info.name for j in jobs if j is not None)

    def _queue(self, job: _Copy) -> None:
        with self._cond:
            self._due, self._reached, self._queued = job, False, job
            if self._draining:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpointer-replica")
            self._draining = True
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the interpreter is exiting: copy in this thread (as async saves do)
            self._drain()

    def _drain(self) -> None:
        copied: tuple[str, int] | None = None
        while True:
            with self._cond:  # one lock for taking a job and stopping: none is ever left queued
                if copied is not None and self._due is not None and self._due.key == copied:
                    self._reached = True
                job, self._queued = self._queued, None
                self._running = job
                if job is None:
                    self._draining = False
                    self._cond.notify_all()
                    return
            try:
                copied = self._copy(job)
            except BaseException as exc:  # a bug must not leave wait() waiting forever
                log.error("replication of %s failed: %s: %s", job.scored.info.name, type(exc).__name__, exc)
                self._error, copied = exc, None

    def _copy(self, job: _Copy) -> tuple[str, int] | None:
        """Copy, then retain and index the replica; ``(name, seq)`` of what was copied (the
        copied manifest's, should the name have been replaced meanwhile), ``None`` on failure."""
        name = job.scored.info.name
        try:
            if not self._listed:
                self._list()
            committed, manifest = self._copier.copy(job.source, name, self.store)
        except (CheckpointError, OSError) as exc:
            self._error = exc
            self._warn(f"replication of {job.source.url_of(name)} to {self.store.url} failed ({exc}); "
                       "the next replication retries with the newest checkpoint")
            return None
        entry = entry_from_manifest(self.store, name, manifest, committed.nbytes - manifest.nbytes,
                                    committed.stamp)
        self.entries = _ordered([s for s in self.entries if s.info.name != name] + [self._score(entry)])
        log.info("replicated %s to %s (%d bytes)", name, entry.info.url, committed.nbytes)
        try:
            self.entries = pruning.prune(self.store, self.retention, self._monitor, self.entries,
                                         job.protected, self._settings, self._score)
        except CheckpointError as exc:  # retention is retried after the next copy
            log.warning("replica retention in %s failed: %s", self.store.url, exc)
        config = self._config if self._monitor is None else {"monitor": self._monitor.metric,
                                                             "mode": self._monitor.mode}
        write_index_quietly(self.store, [s.entry for s in self.entries], config)
        return name, entry.seq

    def _list(self) -> None:
        self.entries, _, self._config = open_tier(self.store, self._monitor, self._score, " in the replica")
        self._listed = True

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        warnings.warn(msg, CheckpointWarning, stacklevel=2)

    # -- waiting -------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until no copy is running or waiting (failures were warnings)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._draining)

    def close(self) -> None:
        """Wait for the copies; retry the newest due checkpoint once if it never reached the
        replica, then stop the copy thread.

        Raises:
            StorageError: the newest due checkpoint did not reach the replica.
        """
        self.wait()
        due = self._due
        if due is not None and not self._reached:
            self._queue(due)
            self.wait()
        self._copier.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if due is not None and not self._reached:
            raise StorageError(f"checkpoint {due.scored.info.name} never reached the replica "
                               f"{self.store.url}: {self._error}")


class Tiers:
    """The manager's two tiers: the ``local`` store and the ``replica`` (``None``: none).
    Every method is a no-op or the local tier alone without a replica."""

    def __init__(self, local: Store, replica: Replica | None) -> None:
        self.local, self.replica = local, replica

    def open(self, entries: Sequence[Scored], protected: Collection[str]) -> None:
        """Rank 0, once the local tier is listed: list the replica and catch it up."""
        if self.replica is not None:
            self.replica.open(self.local, entries, protected)

    def committed(self, entry: Scored, forced: bool, protected: Collection[str]) -> None:
        """A local commit (``forced``: a preemption save): queue its copy when due."""
        if self.replica is not None:
            self.replica.committed(self.local, entry, forced, protected)

    def kept(self, protected: set[str]) -> Collection[str]:
        """What local retention keeps beside ``protected``: what the replica still needs."""
        return protected if self.replica is None else protected | self.replica.busy

    def view(self, local: Sequence[Scored]) -> list[Scored]:
        """Both tiers' checkpoints, oldest first, one per name: the local entry when both
        hold it (or when the local one is newer), the replica's otherwise."""
        if self.replica is None or not self.replica.entries:
            return list(local)
        view = {s.info.name: s for s in self.replica.entries}
        for s in local:
            there = view.get(s.info.name)
            if there is None or s.entry.seq >= there.entry.seq:
                view[s.info.name] = s
        return _ordered(list(view.values()))

    def encode(self, local: Sequence[Scored]) -> Any:
        """Rank 0's view for the other ranks: the local rows, and the replica's beside them."""
        rows = encode_scored(local)
        return rows if self.replica is None else {"local": rows, "replica": encode_scored(self.replica.entries)}

    def decode(self, rows: Any) -> list[Scored]:
        """:meth:`encode` on another rank: the local entries (returned) and the replica's
        (which become ``replica.entries``)."""
        if self.replica is None:
            return decode_scored(self.local, rows)
        rows = rows if isinstance(rows, dict) else {}
        self.replica.entries = decode_scored(self.replica.store, rows.get("replica", []))
        return decode_scored(self.local, rows.get("local", []))

    def agree(self, coord: Coordinator, local: list[Scored]) -> list[Scored]:
        """Rank 0's view on every rank (the replica's list changes in rank 0's copy thread),
        so that every rank restores from the same tier; the local entries."""
        if self.replica is None or coord.world_size == 1:
            return local
        return run_on_primary(coord, lambda: local, self.encode, self.decode)

    def restore(self, coord: Coordinator, which: str | int, candidates: Sequence[Scored],
                can_fall_back: bool, *, fallback: bool, verify: bool,
                specs: dict[str, ShardSpec] | None, listed: Sequence[CheckpointInfo]) -> Checkpoint:
        """:func:`~checkpointer.restoring.load_first` over both tiers: each candidate read
        from the tier its url names; falling back (when allowed), a broken local checkpoint
        is followed by its replica copy."""
        falls = fallback and can_fall_back
        rep = self.replica
        copies = {} if rep is None or not falls else {(s.info.name, s.entry.seq): s for s in rep.entries}
        runs: list[tuple[Store, list[Scored]]] = []
        for s in candidates:
            copy = copies.get((s.info.name, s.entry.seq))
            for c in [s] if copy is None or copy.info.url == s.info.url else [s, copy]:
                store = rep.store if rep is not None and c.info.url == rep.store.url_of(c.info.name) else self.local
                if runs and runs[-1][0] is store:
                    runs[-1][1].append(c)
                else:
                    runs.append((store, [c]))
        *first, last = runs or [(self.local, [])]
        load = partial(load_first, coord=coord, which=which, can_fall_back=can_fall_back,
                       fallback=fallback, verify=verify, specs=specs, listed=listed)
        for store, group in first:
            try:
                return load(store, candidates=group)
            except CheckpointNotFoundError:  # every one of this tier's broke: on to the next
                if not falls:
                    raise
        return load(last[0], candidates=last[1])

    def wait(self, coord: Coordinator, local: list[Scored]) -> list[Scored]:
        """Wait for the replica's copies (rank 0), then give every rank rank 0's view (with
        several processes a collective, as ``close``); the local entries. Retention's
        background deletes (:mod:`checkpointer.reaper`) are waited for first."""
        wait_removals()
        if self.replica is None:
            return local
        self.replica.wait()
        return self.agree(coord, local)

    def close(self, coord: Coordinator) -> None:
        """:meth:`Replica.close` on rank 0, its outcome (an error) on every rank (after
        retention's background deletes)."""
        wait_removals()
        if self.replica is not None:
            run_on_primary(coord, self.replica.close, lambda _: None, lambda _: None)
