"""``CheckpointManager``: the one place that calls schedule, monitor, format, storage and
retention, in that order.

Call order, as seen from storage (like DCP's ``StorageWriter`` docstring):

1. construction: list the directory once, clean up the engine's dead leftovers, load the
   index (rebuilt from manifests when missing or stale);
2. ``epoch_end`` / ``step_end``: schedule -> monitor -> (state extracted only now) ->
   data files -> manifest -> commit -> retention deletes -> index rewrite;
3. ``save``: as 2 without the schedule and the ``save_best_only`` test;
4. ``restore``: manifest -> data files with verification, falling back when allowed;
5. ``close``: waits for an in-flight asynchronous save and raises its error.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import collective, commit
from .async_save import AsyncWriter
from .distributed import Coordinator, background_coordinator, detect_coordinator, run_on_primary
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    MetricError,
    StorageError,
)
from .index import Entry, decode_entry, encode_entry, load_entries, write_index
from .info import Checkpoint, CheckpointInfo
from .load import load_checkpoint
from .monitor import Monitor, to_float
from .naming import default_name, format_name, template_fields
from .retention import Record, Retention, best_record
from .schedule import Schedule
from .sharding import ShardedArray
from .storage import open_store
from .tree import flatten, resolve_state, specs_from_template

__all__ = ["CheckpointManager", "CheckpointWarning"]

log = logging.getLogger("checkpointer")


class CheckpointWarning(UserWarning):
    """A save went ahead without something it should have had (e.g. the monitored metric)."""


class CheckpointManager:
    """Save, rank, retain and restore checkpoints in one directory (any fsspec URL).

    Example::

        with CheckpointManager("ckpts", monitor="val_loss", keep_best=2, keep_last=1) as mgr:
            for epoch in range(1, 11):
                ...
                mgr.epoch_end(epoch, lambda: {"w": w}, metrics={"val_loss": loss})
        state = CheckpointManager("ckpts").restore("best").state

    Raises:
        ConfigurationError: on any invalid option, at construction.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, monitor: str | None = None, mode: str = "auto",
        min_delta: float = 0.0, initial_value_threshold: float | None = None,
        save_best_only: bool = False, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
        every_seconds: float | None = None, keep_last: int | None = None, keep_best: int | None = None,
        filename: str | None = None, nan_policy: str = "worst", async_save: bool = False,
        storage_options: dict[str, Any] | None = None, clock: Callable[[], float] = time.time,
        filesystem: Any = None, max_file_bytes: int = commit.DEFAULT_MAX_FILE_BYTES,
        coordinator: Coordinator | None = None,
    ) -> None:
        if nan_policy not in ("worst", "skip", "raise"):
            raise ConfigurationError(f"nan_policy must be 'worst', 'skip' or 'raise', got {nan_policy!r}")
        self._monitor = None if monitor is None else Monitor.create(
            monitor, mode, min_delta, initial_value_threshold, nan_policy)
        if self._monitor is None and mode not in ("auto", "min", "max"):
            raise ConfigurationError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        for flag, what in ((save_best_only, "save_best_only=True"), (keep_best, "keep_best")):
            if flag and self._monitor is None:
                raise ConfigurationError(f"{what} needs a monitor (a metric name to rank by)")
        self._schedule = Schedule(every_n_epochs, every_n_steps, every_seconds)
        self._retention = Retention(keep_last, keep_best)
        if filename is not None:
            template_fields(filename)
        if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
            raise ConfigurationError(f"max_file_bytes must be a positive int, got {max_file_bytes!r}")
        self.save_best_only, self.filename, self._clock = bool(save_best_only), filename, clock
        self._nan_policy, self._max_file_bytes = nan_policy, max_file_bytes
        self._store = open_store(directory, storage_options, filesystem)
        self._protected: set[str] = set()
        self._started = clock()
        self._last_started = self._started
        self._async = AsyncWriter() if async_save else None
        self._coord = coordinator if coordinator is not None else detect_coordinator()
        # several processes save asynchronously through a coordinator of their own
        self._bg = background_coordinator(self._coord) if async_save else None
        self._bg_released = False
        if async_save and self._coord.world_size > 1 and self._bg is None:
            log.info("%s offers no background coordinator: saves are synchronous",
                     type(self._coord).__name__)
        self._entries: list[Entry] = []
        self._entries = run_on_primary(self._coord, self._open_directory, self._encode_entries,
                                       self._decode_entries)

    def _open_directory(self) -> list[Entry]:
        listing = self._store.list_files()
        removed = commit.cleanup(self._store, listing)
        if removed:
            log.info("removed unfinished leftovers of dead writers: %s", ", ".join(removed))
            listing = self._store.list_files()
        self._entries, stale = load_entries(self._store, listing)
        if stale and self._entries:
            self._write_index_quietly()
        return self._entries

    def _encode_entries(self, entries: list[Entry]) -> Any:
        return [encode_entry(e) for e in entries]

    def _decode_entries(self, rows: Any) -> list[Entry]:
        return [e for e in (decode_entry(self._store, r) for r in rows) if e is not None]

    # -- public properties -------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The manager's directory as a path or URL."""
        return self._store.url

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return [e.info for e in self._entries]

    @property
    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint."""
        return self._entries[-1].info if self._entries else None

    @property
    def best(self) -> CheckpointInfo | None:
        """The best ranked checkpoint by the monitor (``None`` without a monitor or ranking)."""
        entries = self._entries  # one snapshot: a background save may replace the list
        rec = best_record(self._records(entries), self._monitor)
        return next((e.info for e in entries if e.info.name == rec.name), None) if rec else None

    # -- save points ----------------------------------------------------------------

    def epoch_end(self, epoch: int, state: Any, *, step: int | None = None,
                  metrics: dict[str, Any] | None = None) -> CheckpointInfo | None:
        """End of epoch ``epoch``: save if the schedule and the monitor say so.

        ``state`` may be a zero-argument callable, called only when a save happens.
        Returns the new checkpoint's info, or ``None`` (the reason is logged).
        """
        def decide() -> dict[str, Any] | None:
            self._raise_background_error()
            reason = self._schedule.at_epoch(epoch, self._since(), self._clock())
            if reason is None:
                log.debug("epoch %s: not a save point", epoch)
                return None
            return self._plan(step, epoch, metrics, reason, best_only=self.save_best_only)
        return self._run(decide, state)

    def step_end(self, step: int, state: Any, *,
                 metrics: dict[str, Any] | None = None) -> CheckpointInfo | None:
        """End of step ``step``: save if the schedule and the monitor say so."""
        def decide() -> dict[str, Any] | None:
            self._raise_background_error()
            reason = self._schedule.at_step(step, self._since(), self._clock())
            if reason is None:
                log.debug("step %s: not a save point", step)
                return None
            return self._plan(step, None, metrics, reason, best_only=self.save_best_only)
        return self._run(decide, state)

    def save(self, state: Any, *, step: int | None = None, epoch: int | None = None,
             metrics: dict[str, Any] | None = None) -> CheckpointInfo:
        """Save now, whatever the schedule and ``save_best_only``; ranked and retained as usual."""
        def decide() -> dict[str, Any] | None:
            self._raise_background_error()
            return self._plan(step, epoch, metrics, "an explicit save", best_only=False, force=True)
        info = self._run(decide, state)
        assert info is not None
        return info

    def _plan(self, step: int | None, epoch: int | None, metrics: dict[str, Any] | None,
              reason: str, *, best_only: bool, force: bool = False) -> dict[str, Any] | None:
        """Apply the monitor; the plan of the save (plain data, shared with other ranks)."""
        score, skip = self._score(metrics)
        where = f"epoch {epoch}" if epoch is not None else f"step {step}"
        if skip and not force:
            log.info("%s: not saved: %s", where, skip)
            return None
        if best_only and self._monitor is not None:
            best = self._best_score()
            if score is None or not self._monitor.is_improvement(score, best):
                log.info("%s: not saved: %s=%s is not an improvement on %s", where,
                         self._monitor.metric, score, best)
                return None
        log.debug("%s: saving (%s)", where, reason)
        clean = {k: _metric_value(k, v) for k, v in (metrics or {}).items()}
        seq = max([e.seq for e in self._entries] + [-1]) + 1
        if self._async is not None:
            seq = max(seq, self._async.pending_seq + 1)
        name = (format_name(self.filename, epoch=epoch, step=step, metrics=clean)
                if self.filename else default_name(epoch=epoch, step=step, seq=seq))
        return {"name": name, "seq": seq, "step": step, "epoch": epoch, "metrics": clean,
                "score": score, "time": float(self._clock())}

    def _score(self, metrics: dict[str, Any] | None) -> tuple[float | None, str | None]:
        """The monitored value and, when the save must be skipped, why."""
        mon = self._monitor
        if mon is None:
            return None, None
        value = mon.extract(metrics)
        if value is None:
            msg = (f"monitored metric {mon.metric!r} is missing from the metrics "
                   f"({sorted(metrics or {})}); this save point is not ranked")
            log.warning(msg)
            warnings.warn(msg, CheckpointWarning, stacklevel=5)
            return None, (f"{mon.metric!r} is missing" if self.save_best_only else None)
        if not math.isfinite(value):
            if self._nan_policy == "raise":
                raise MetricError(f"monitored metric {mon.metric!r} is {value} (nan_policy='raise')")
            if self._nan_policy == "skip":
                return None, f"{mon.metric!r} is {value} (nan_policy='skip')"
        return value, None

    def _run(self, decide: Callable[[], dict[str, Any] | None], state: Any) -> CheckpointInfo | None:
        """Decide (on rank 0 when there are several), then write."""
        if self._coord.world_size == 1:
            plan = decide()
            return None if plan is None else self._execute(plan, state)
        if self._bg_released:  # saving again after close(): every rank is here too
            self._bg, self._bg_released = background_coordinator(self._coord), False

        def decide_after_previous() -> dict[str, Any] | None:
            plan = decide()
            if plan is not None and self._bg is not None:
                assert self._async is not None
                self._async.wait()  # the previous save's error is everyone's, raised here
            return plan

        plan = run_on_primary(self._coord, decide_after_previous, lambda p: p, lambda p: p)
        return None if plan is None else self._execute_with_ranks(plan, state)

    def _execute_with_ranks(self, plan: dict[str, Any], state: Any) -> CheckpointInfo | None:
        """Every rank writes its part of the save ``plan``: now, or (with a background
        coordinator) from each rank's writer thread once every rank has staged its part."""
        self._last_started = plan["time"]
        writer = self._async if self._bg is not None else None
        coord = self._bg or self._coord
        error: Exception | None = None
        try:  # a rank that cannot prepare its part still takes part, to fail every rank
            skeleton, arrays = flatten(resolve_state(state))
            if writer is not None:  # followers write their pieces only: stage just those
                mine = arrays if coord.rank == 0 else [(k, v) for k, v in arrays if isinstance(v, ShardedArray)]
                arrays = writer.stage(mine)
        except Exception as exc:
            error, skeleton, arrays = exc, None, []
        if writer is not None:  # every rank raises now, or every rank saves in the background
            agreed = collective.agree(self._coord, error)
            if agreed is not None:
                raise agreed
        record = Record(plan["name"], plan["seq"], plan["score"], True)
        if coord.rank != 0:
            def follow() -> None:
                rows = collective.follower_save(coord, self._store, arrays, self._max_file_bytes, error)
                self._entries = self._decode_entries(rows)
            if writer is None:
                follow()
                return next((e.info for e in self._entries if e.info.name == plan["name"]), None)
            writer.submit(plan["seq"], record, _errors_reported_by_rank0(follow))
            return self._info(plan, 0)

        def write(parts: commit.Participants) -> CheckpointInfo:
            if error is not None:
                raise error
            return self._write_and_commit(plan, skeleton, arrays, parts)

        def lead() -> CheckpointInfo:
            return collective.primary_save(coord, write, lambda: self._encode_entries(self._entries))
        if writer is None:
            return lead()
        writer.submit(plan["seq"], record, lead)
        return self._info(plan, 0)

    def _execute(self, plan: dict[str, Any], state: Any) -> CheckpointInfo:
        """Write now, or snapshot and write in the background (the info returned then has
        ``nbytes=0``; ``latest`` carries the size once it has committed)."""
        self._last_started = plan["time"]
        skeleton, arrays = flatten(resolve_state(state))
        if self._async is None:
            return self._write_and_commit(plan, skeleton, arrays)
        staged = self._async.stage(arrays)
        self._async.submit(plan["seq"], Record(plan["name"], plan["seq"], plan["score"], True),
                           lambda: self._write_and_commit(plan, skeleton, staged))
        return self._info(plan, 0)

    def _info(self, plan: dict[str, Any], nbytes: int) -> CheckpointInfo:
        return CheckpointInfo(plan["name"], self._store.url_of(plan["name"]), plan["step"],
                              plan["epoch"], plan["metrics"], plan["time"], nbytes)

    def _write_and_commit(self, plan: dict[str, Any], skeleton: Any, arrays: Any,
                          participants: commit.Participants | None = None) -> CheckpointInfo:
        name = plan["name"]
        fields = {"step": plan["step"], "epoch": plan["epoch"], "metrics": plan["metrics"],
                  "time": plan["time"], "managed": True, "seq": plan["seq"],
                  "library": _library_version(), "metadata": None}
        try:
            nbytes, stamp = commit.write_checkpoint(self._store, name, skeleton, arrays, fields,
                                                    max_file_bytes=self._max_file_bytes,
                                                    participants=participants)
        except CheckpointError as exc:
            log.error("save of %s failed: %s", self._store.url_of(name), exc)
            raise
        except OSError as exc:
            raise StorageError(f"save of {self._store.url_of(name)} failed: {exc}") from exc
        info = self._info(plan, nbytes)
        entry = Entry(info, plan["seq"], True, stamp)  # stamp "": re-checked on reopen
        self._entries = [e for e in self._entries if e.info.name != name] + [entry]
        log.info("saved %s (%d bytes)", info.url, nbytes)
        self._apply_retention()
        self._write_index_quietly()
        return info

    def _apply_retention(self) -> None:
        for name in self._retention.to_delete(self._records(), self._monitor, self._protected):
            try:
                commit.remove_checkpoint(self._store, name)
            except CheckpointError as exc:
                log.warning("could not delete %s: %s", self._store.url_of(name), exc)
                continue
            self._entries = [e for e in self._entries if e.info.name != name]
            log.info("deleted %s (outside keep_last=%s / keep_best=%s)", self._store.url_of(name),
                     self._retention.keep_last, self._retention.keep_best)

    def _write_index_quietly(self) -> None:
        try:
            config = {} if self._monitor is None else {
                "monitor": self._monitor.metric, "mode": self._monitor.mode}
            write_index(self._store, self._entries, config)
        except CheckpointError as exc:  # the index is a cache; the manifests are the truth
            log.warning("could not write the index: %s", exc)

    # -- restore ----------------------------------------------------------------------

    def restore(self, which: str | int = "latest", *, verify: bool = True, fallback: bool = True,
                template: Any = None) -> Checkpoint:
        """Load a checkpoint: ``"latest"``, ``"best"``, a name, or a step number.

        ``"latest"``/``"best"`` fall back to the next newest/best that verifies (with a
        warning naming the broken one) unless ``fallback=False``. ``template`` is a tree
        whose :class:`~checkpointer.sharding.ShardSpec` (or ``ShardedArray``) leaves name
        the pieces this process wants of sharded arrays; only those bytes are read. With
        several processes every rank loads its part and all agree on the outcome.

        Raises:
            CheckpointNotFoundError: nothing matches (or nothing verifies).
            CorruptCheckpointError: the requested checkpoint fails verification.
        """
        self.wait()
        specs = specs_from_template(template) if template is not None else None
        candidates, can_fall_back = self._candidates(which)
        for entry in candidates:
            error: BaseException | None = None
            try:
                tree, _ = load_checkpoint(self._store, entry.info.name, verify=verify, specs=specs)
            except (CheckpointError, OSError) as exc:
                error = exc
            if self._coord.world_size > 1:
                error = collective.agree(self._coord, error)
            if error is None:
                self._protected.add(entry.info.name)
                log.info("restored %s", entry.info.url)
                return Checkpoint(entry.info, tree)
            if not (fallback and can_fall_back):
                raise error
            msg = f"checkpoint {entry.info.url} is broken ({error}); falling back"
            log.warning(msg)
            warnings.warn(msg, CheckpointWarning, stacklevel=2)
        raise CheckpointNotFoundError(f"no checkpoint in {self._store.url} matches {which!r}"
                                      + (" and verifies" if candidates else ""))

    def _candidates(self, which: str | int) -> tuple[list[Entry], bool]:
        if which == "latest":
            return list(reversed(self._entries)), True
        if which == "best":
            if self._monitor is None:
                raise ConfigurationError("restore('best') needs a monitor")
            mon = self._monitor
            ranked = [e for e, r in zip(self._entries, self._records(), strict=True)
                      if r.score is not None and math.isfinite(r.score)]
            return sorted(ranked, key=lambda e: (mon.sort_key(self._score_of(e)), e.seq)), True
        if isinstance(which, int) and not isinstance(which, bool):
            return [e for e in reversed(self._entries) if e.info.step == which], False
        if isinstance(which, str):
            return [e for e in self._entries if e.info.name == which], False
        raise ConfigurationError(f"restore() takes 'latest', 'best', a name or a step, got {which!r}")

    # -- helpers ------------------------------------------------------------------------

    def _score_of(self, e: Entry) -> float | None:
        if self._monitor is None:
            return None
        try:
            return self._monitor.extract(e.info.metrics)
        except MetricError:
            return None

    def _records(self, entries: list[Entry] | None = None) -> list[Record]:
        return [Record(e.info.name, e.seq, self._score_of(e), e.managed)
                for e in (self._entries if entries is None else entries)]

    def _best_score(self) -> float | None:
        records = self._records()
        if self._async is not None and self._async.pending_record is not None:
            records.append(self._async.pending_record)
        rec = best_record(records, self._monitor)
        return rec.score if rec else None

    def _since(self) -> float:
        """When the last save started (an in-flight one included), or the run started."""
        return max([self._started, self._last_started] + [e.info.time for e in self._entries])

    def _raise_background_error(self) -> None:
        if self._async is not None:
            self._async.raise_error()

    def wait(self) -> None:
        """Block until an in-flight asynchronous save has committed; raise its error."""
        if self._async is not None:
            if self._coord.rank != 0:
                self._async.wait()  # this rank's part (its errors are rank 0's to report)
            run_on_primary(self._coord, self._async.wait, lambda _: None, lambda _: None)

    def close(self) -> None:
        """Wait for any in-flight save, then release resources (with several processes, the
        writer threads' coordinator too: a later save makes a new one). With several
        processes, call it before the process group is destroyed."""
        if self._async is not None:
            if self._coord.rank != 0:
                self._async.close()
            run_on_primary(self._coord, self._async.close, lambda _: None, lambda _: None)
        if self._bg is not None:  # every rank's writer is done with it: release it
            bg, self._bg, self._bg_released = self._bg, None, True
            release = getattr(bg, "close", None)
            if release is not None:
                release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _errors_reported_by_rank0(job: Callable[[], None]) -> Callable[[], None]:
    """A follower's background job: its errors reach every rank through rank 0 (the
    collective shares the outcome), so raising them here too would raise them twice."""
    def run() -> None:
        try:
            job()
        except Exception as exc:
            log.debug("background save part failed (reported by rank 0): %s", exc)
    return run


def _metric_value(name: Any, value: Any) -> Any:
    if not isinstance(name, str) or not name:
        raise MetricError(f"metric names must be non-empty str, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise MetricError(f"metric name {name!r} is not valid unicode") from None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)  # a batch or step count stays an int for {batch:02d}
    return to_float(name, value)


def _library_version() -> str:
    from . import __version__
    return f"checkpointer-engine {__version__}"
