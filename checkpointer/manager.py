"""``CheckpointManager``: the one place that calls schedule, monitor, format, storage and
retention, in that order. It decides, then executes: the schedule and the
:class:`~checkpointer.plan.Planner` turn a save point into a frozen
:class:`~checkpointer.plan.SavePlan` before any state is extracted (on rank 0, which sends it
to the other ranks); executing the plan writes, commits and retains.

Call order, as seen from storage (like DCP's ``StorageWriter`` docstring):

1. construction: list the directory once, clean up the engine's dead leftovers, load the
   index (rebuilt from manifests when missing or stale) and score each checkpoint once;
   the same in the replica, if any (:mod:`checkpointer.tiers`);
2. ``epoch_end`` / ``step_end``: schedule -> monitor (the plan) -> (state extracted only
   now) -> data files -> manifest -> commit -> replica copy queued -> retention deletes ->
   index rewrite (from "data files" on in the writer thread with ``async_save``);
3. ``save``: as 2 without the schedule and the ``save_best_only`` test;
4. ``restore``: manifest -> data files (of either tier) verified, falling back when allowed;
5. ``wait`` / ``close``: the in-flight asynchronous save (its error raised), then the
   replica's copies (``close`` raises when the newest due one never reached the replica).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from . import collective, commit, pruning
from .async_save import AsyncWriter
from .distributed import Coordinator, background_coordinator, detect_coordinator, run_on_primary
from .errors import CheckpointError, ConfigurationError, StorageError
from .hints import unknown_options
from .index import Entry, read_index_meta, settings_key, write_index_quietly
from .info import Checkpoint, CheckpointInfo
from .monitor import optional_monitor
from .payload import PayloadWriter, StagedFile, check_payload, fresh_run, prepare
from .plan import (
    CheckpointWarning,
    Planner,
    SavePlan,
    Scored,
    decode_plan,
    encode_plan,
    recorded_monitor,
    restore_order,
    warn_no_step_schedule,
)
from .preemption import DEFAULT_SIGNALS, PREEMPTION, Preemption
from .retention import Retention, best_record
from .schedule import Schedule, warn_if_dated_ahead
from .storage import open_store
from .tiers import open_tier, open_tiers
from .tree import specs_from_template
from .version import LIBRARY

__all__ = ["CheckpointManager", "CheckpointWarning"]

log = logging.getLogger("checkpointer")
_WALL_CLOCK = time.time


class CheckpointManager:
    """Save, rank, retain and restore checkpoints in one directory (any fsspec URL).

    Example::

        with CheckpointManager("ckpts", monitor="val_loss", keep_best=2, keep_last=1) as mgr:
            for epoch in range(1, 11):
                ...
                mgr.epoch_end(epoch, lambda: {"w": w}, metrics={"val_loss": loss})
        state = CheckpointManager("ckpts").restore("best").state

    Raises:
        ConfigurationError: on any invalid option, at construction; an option it does not
            take is an ``UnknownOptionError`` (also a ``TypeError``) naming the one meant.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, monitor: str | None = None, mode: str = "auto",
        min_delta: float = 0.0, initial_value_threshold: float | None = None,
        save_best_only: bool = False, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
        every_seconds: float | None = None, keep_last: int | None = None, keep_best: int | None = None,
        keep_every_n_steps: int | None = None, keep_every_n_epochs: int | None = None,
        keep_every_seconds: float | None = None, filename: str | None = None, nan_policy: str = "worst", async_save: bool = False,
        storage_options: dict[str, Any] | None = None, clock: Callable[[], float] = _WALL_CLOCK,
        filesystem: Any = None, max_file_bytes: int = commit.DEFAULT_MAX_FILE_BYTES,
        coordinator: Coordinator | None = None, save_on_preemption: bool = False,
        preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS, replica: str | os.PathLike[str] | None = None,
        replica_every: int = 1, replica_keep_last: int | None = None, replica_keep_best: int | None = None,
        replica_storage_options: dict[str, Any] | None = None, payload: PayloadWriter | None = None,
        rank_existing: bool = True, **unknown: Any,
    ) -> None:
        if unknown:  # a typo or another library's name (max_to_keep): say which is meant
            raise unknown_options("CheckpointManager", unknown, CheckpointManager.__init__)
        self._monitor = optional_monitor(monitor, mode, min_delta, initial_value_threshold, nan_policy)
        for flag, what in ((save_best_only, "save_best_only=True"), (keep_best, "keep_best")):
            if flag and self._monitor is None:
                raise ConfigurationError(f"{what} needs a monitor (a metric name to rank by)")
        self._schedule = Schedule(every_n_epochs, every_n_steps, every_seconds)
        self._warn_steps = every_n_steps is None and every_seconds is None  # step_end never saves
        self._retention = Retention(keep_last, keep_best, keep_every_n_steps, keep_every_n_epochs,
                                    keep_every_seconds)
        self._settings = pruning.recorded_settings(self._monitor, self._retention)
        self._planner = Planner(self._monitor, filename, bool(save_best_only), clock)
        if not isinstance(max_file_bytes, int) or max_file_bytes < 1:
            raise ConfigurationError(f"max_file_bytes must be a positive int, got {max_file_bytes!r}")
        self._clock, self._max_file_bytes = clock, max_file_bytes
        # the every_seconds timer: this process's monotonic clock (an injected clock, if any)
        self._tick = time.monotonic if clock is _WALL_CLOCK else clock
        self._store = open_store(directory, storage_options, filesystem)
        self._tiers = open_tiers(self._store, replica, replica_storage_options, replica_every, replica_keep_last,
                                 replica_keep_best, retention=self._retention, monitor=self._monitor,
                                 settings=self._settings, score=self._planner.scored)
        self._protected: set[str] = set()
        self._last_started = self._tick()  # the timer counts from the run's start
        self._async: AsyncWriter[SavePlan] | None = AsyncWriter() if async_save else None
        self._async_seq = -1  # the last background save's, kept after it ends (see _next_seq)
        self._coord = coordinator if coordinator is not None else detect_coordinator()
        self._payload = check_payload(payload, filename, replica, self._coord.world_size)
        # several processes save asynchronously through a coordinator of their own
        self._bg = background_coordinator(self._coord) if async_save else None
        self._bg_released = False
        if async_save and self._coord.world_size > 1 and self._bg is None:
            log.info("%s offers no background coordinator: saves are synchronous", type(self._coord).__name__)
        self._kept_config: dict[str, str] = {}  # the index's monitor, kept when we have none
        # the local tier's committed checkpoints, oldest first; replaced, never mutated
        self._entries: list[Scored] = run_on_primary(self._coord, self._open_directory,
                                                     self._tiers.encode, self._tiers.decode)
        self._entries = self._entries if rank_existing else fresh_run(self._entries, self._protected)
        if every_seconds is not None:
            warn_if_dated_ahead([(e.info.name, e.info.time) for e in self._entries], clock(), CheckpointWarning)
        self._preempt = Preemption(save_on_preemption, preemption_signals)  # last: it installs handlers

    def _open_directory(self) -> list[Scored]:
        self._entries, stale, self._kept_config = open_tier(self._store, self._monitor, self._planner.scored)
        if stale and self._entries:
            self._write_index_quietly()
        self._tiers.open(self._entries, self._protected)  # the replica listed, caught up
        return self._entries

    def _adopt_rows(self, rows: Any) -> None:
        self._entries = self._tiers.decode(rows)

    # -- public properties -------------------------------------------------------------

    @property
    def directory(self) -> str:
        """The manager's directory as a path or URL."""
        return self._store.url

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints of both tiers, oldest first (``url``: where each is read from)."""
        return [e.info for e in self._tiers.view(self._entries)]

    @property
    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint."""
        return next(reversed([s.info for s in self._tiers.view(self._entries)]), None)

    @property
    def best(self) -> CheckpointInfo | None:
        """The best ranked checkpoint by the monitor (``None`` without a monitor or ranking)."""
        entries = self._tiers.view(self._entries)  # one snapshot: a background save may replace the lists
        rec = best_record([s.record for s in entries], self._monitor)
        return next((s.info for s in entries if s.info.name == rec.name), None) if rec else None

    # -- save points: decide (on rank 0 when there are several), then execute ------------

    def epoch_end(self, epoch: int, state: Any, *, step: int | None = None,
                  metrics: dict[str, Any] | None = None) -> CheckpointInfo | None:
        """End of epoch ``epoch``: save if the schedule and the monitor say so.

        ``state`` may be a zero-argument callable, called only when a save happens.
        Returns the new checkpoint's info, or ``None`` (the reason is logged).
        """
        return self._save_point(partial(self._schedule.at_epoch, epoch), f"epoch {epoch}", step,
                                epoch, metrics, state)

    def step_end(self, step: int, state: Any, *,
                 metrics: dict[str, Any] | None = None) -> CheckpointInfo | None:
        """End of step ``step``: save if the schedule and the monitor say so (a schedule
        without ``every_n_steps`` or ``every_seconds`` never does: warned once)."""
        if self._warn_steps:  # once: nothing in the schedule can fire at a step
            self._warn_steps = warn_no_step_schedule(step)
        return self._save_point(partial(self._schedule.at_step, step), f"step {step}", step, None,
                                metrics, state)

    def save(self, state: Any, *, step: int | None = None, epoch: int | None = None,
             metrics: dict[str, Any] | None = None) -> CheckpointInfo:
        """Save now, whatever the schedule and ``save_best_only``; ranked and retained as usual."""
        info = self._save_point(None, "save", step, epoch, metrics, state)
        assert info is not None
        return info

    @property
    def preempted(self) -> bool:
        """A preemption save has committed: the training loop should stop (later save points
        return that checkpoint's info without saving again)."""
        return self._preempt.done is not None

    def request_preemption(self) -> None:
        """The same as receiving a preemption signal: the next save point saves, whatever the
        schedule says, and sets :attr:`preempted` (several processes without
        ``save_on_preemption``: call it on every rank at the same step)."""
        self._preempt.request()

    def _save_point(self, schedule: Callable[[float, float], str | None] | None, where: str,
                    step: int | None, epoch: int | None, metrics: dict[str, Any] | None,
                    state: Any) -> CheckpointInfo | None:
        """A preemption notice (any rank's) turns this point into a forced save that waits
        until it has committed; after it, every point returns its info."""
        if self._preempt.done is not None:
            return self._preempt.done
        notice = self._preempt.notice(self._coord)
        forced = None if notice is None else f"{PREEMPTION} ({notice})"
        plan, info = self._run(partial(self._decide, None if forced else schedule, where, step,
                                       epoch, metrics, forced), state)
        if plan is None or not plan.reason.startswith(PREEMPTION):
            return info
        self._wait_saves()  # committed, also with async_save, before the loop is told to stop
        self._preempt.done = next((s.info for s in self._entries if s.info.name == plan.name), info)
        log.warning("%s: saved %s; training should stop", plan.reason, self._store.url_of(plan.name))
        return self._preempt.done

    def _decide(self, schedule: Callable[[float, float], str | None] | None, where: str,
                step: int | None, epoch: int | None, metrics: dict[str, Any] | None,
                forced: str | None = None) -> SavePlan | None:
        """The schedule (``None``: an explicit or ``forced`` save), then the planner."""
        if self._async is not None:
            self._async.raise_error()
        now = self._tick()
        reason = forced or ("an explicit save" if schedule is None else schedule(self._last_started, now))
        if reason is None:
            log.debug("%s: not a save point", where)
            return None
        plan = self._planner.plan(step, epoch, metrics, reason, seq=self._next_seq(),
                                  best=self._best_score, force=schedule is None)
        if plan is not None and self._async is not None and self._bg is not None:
            self._async.wait()  # several ranks: the previous save's error is everyone's, raised here
        return plan

    def _run(self, decide: Callable[[], SavePlan | None], state: Any
             ) -> tuple[SavePlan | None, CheckpointInfo | None]:
        """Decide (on rank 0 when there are several), then execute."""
        if self._coord.world_size == 1:
            plan = decide()
            return plan, None if plan is None else self._execute(plan, state)
        if self._bg_released:  # saving again after close(): every rank is here too
            self._bg, self._bg_released = background_coordinator(self._coord), False
        plan = run_on_primary(self._coord, decide, encode_plan, decode_plan)
        return plan, None if plan is None else self._execute_with_ranks(plan, state)

    def _execute(self, plan: SavePlan, state: Any) -> CheckpointInfo:
        """Write now, or snapshot (or stage a payload) and write in the background (then ``nbytes=0``)."""
        self._last_started = self._tick()
        skeleton, arrays = prepare(self._store, plan.name, state, self._payload)
        if self._async is None:
            return self._write_and_commit(plan, skeleton, arrays)
        staged = arrays if isinstance(arrays, StagedFile) else self._async.stage(arrays)
        self._submit(plan, partial(self._write_and_commit, plan, skeleton, staged))
        return plan.info(self._store.url_of(plan.name), 0)

    def _execute_with_ranks(self, plan: SavePlan, state: Any) -> CheckpointInfo | None:
        """Every rank writes its part of ``plan`` (see :mod:`checkpointer.collective`): now,
        or (with a background coordinator) from each rank's writer thread."""
        self._last_started = self._tick()
        writer = self._async if self._bg is not None else None
        coord = self._bg or self._coord
        part = collective.rank_part(state, coord.rank, None if writer is None else writer.stage)
        save = collective.RankedSave(coord, part, self._store, self._max_file_bytes,
                                     partial(self._write_and_commit, plan),
                                     lambda: self._tiers.encode(self._entries), self._adopt_rows)
        if writer is None:
            info = save.run()
            return info if coord.rank == 0 else next(
                (s.info for s in self._entries if s.info.name == plan.name), None)
        collective.save_in_background(save, self._coord, partial(self._submit, plan))
        return plan.info(self._store.url_of(plan.name), 0)

    def _submit(self, plan: SavePlan, job: Callable[[], object]) -> None:
        assert self._async is not None
        self._async_seq = plan.seq
        self._async.submit(job, pending=plan, label=plan.name)

    def _write_and_commit(self, plan: SavePlan, skeleton: Any, arrays: Any,
                          participants: commit.Participants | None = None) -> CheckpointInfo:
        name = plan.name
        fields = {"step": plan.step, "epoch": plan.epoch, "metrics": dict(plan.metrics),
                  "time": plan.time, "managed": True, "seq": plan.seq, "library": LIBRARY,
                  "metadata": None, "retention": self._settings}
        try:
            nbytes, stamp = arrays.commit(fields) if isinstance(arrays, StagedFile) else commit.write_checkpoint(
                self._store, name, skeleton, arrays, fields, max_file_bytes=self._max_file_bytes, participants=participants)
        except CheckpointError as exc:
            log.error("save of %s failed: %s", self._store.url_of(name), exc)
            raise
        except OSError as exc:
            raise StorageError(f"save of {self._store.url_of(name)} failed: {exc}") from exc
        info = plan.info(self._store.url_of(plan.name), nbytes)
        entry = Scored(Entry(info, plan.seq, True, stamp, True, settings_key(self._settings)), plan.score)
        self._entries = [s for s in self._entries if s.info.name != name] + [entry]
        log.info("saved %s (%d bytes)", info.url, nbytes)
        # queued before local retention, which keeps what the replica still needs
        self._tiers.committed(entry, plan.reason.startswith(PREEMPTION), self._protected)
        self._apply_retention()
        self._write_index_quietly()
        return info

    def _apply_retention(self) -> None:
        self._entries = pruning.prune(self._store, self._retention, self._monitor, self._entries,
                                      self._tiers.kept(self._protected), self._settings, self._planner.scored)

    def explain_retention(self) -> list[tuple[CheckpointInfo, bool, list[str]]]:
        """For every local checkpoint, oldest first: whether retention keeps it and every
        reason ("latest", "best", "last 2", "top 3 by val_loss", "step multiple of 1000",
        "restored from", ...); the index's rows are first confirmed by their manifests."""
        self._wait_saves()
        self._entries = pruning.confirm(self._store, self._entries, self._planner.scored)
        why = pruning.explain(self._retention, self._monitor, self._entries, self._protected,
                              self._settings)
        return [(s.info, bool(why[s.info.name]), why[s.info.name]) for s in self._entries]

    def _write_index_quietly(self) -> None:
        config = self._kept_config if self._monitor is None else {
            "monitor": self._monitor.metric, "mode": self._monitor.mode}
        write_index_quietly(self._store, [s.entry for s in self._entries], config)

    # -- restore ----------------------------------------------------------------------

    def restore(self, which: str | int = "latest", *, verify: bool = True, fallback: bool = True,
                template: Any = None) -> Checkpoint:
        """Load a checkpoint of either tier: ``"latest"``, ``"best"``, a name, or a step.

        ``"latest"``/``"best"`` fall back to the next newest/best that verifies (with a
        warning naming the broken one) unless ``fallback=False``; ``"best"`` without a
        monitor ranks by the one the directory records (the index's, else the newest
        manifest's). ``template``: a tree whose :class:`~checkpointer.sharding.ShardSpec`
        (or ``ShardedArray``) leaves name the pieces of sharded arrays this process wants
        (only those bytes are read). Every rank loads its part; all agree on the outcome.

        Raises:
            CheckpointNotFoundError: nothing matches (or nothing verifies); the message
                lists the steps or names there.
            ConfigurationError: ``"best"`` with no monitor given or recorded.
            CorruptCheckpointError: the requested checkpoint fails verification.
        """
        self._wait_saves()
        specs = specs_from_template(template) if template is not None else None
        self._entries = self._tiers.agree(self._coord, self._entries)  # one tier on every rank
        view = self._tiers.view(self._entries)
        order = restore_order(view, which, self._monitor,
                              lambda: recorded_monitor(read_index_meta(self._store), view))
        got = self._tiers.restore(self._coord, which, *order, fallback=fallback, verify=verify,
                                  specs=specs, listed=[s.info for s in view])
        self._protected.add(got.info.name)
        return got

    def _next_seq(self) -> int:
        # a background save in flight (or failed) is not listed yet: its seq is never reused
        return max([s.entry.seq for s in self._tiers.view(self._entries)] + [self._async_seq]) + 1

    def _best_score(self) -> float | None:
        """The best score so far, a background save in flight included."""
        pending = None if self._async is None else self._async.pending
        records = [s.record for s in self._tiers.view(self._entries)] + ([] if pending is None else [pending.record])
        rec = best_record(records, self._monitor)
        return rec.score if rec else None

    def wait(self) -> None:
        """Block until an in-flight asynchronous save has committed (raising its error) and
        the replica's copies have ended (their failures are warnings): on every rank."""
        self._wait_saves()
        self._entries = self._tiers.wait(self._coord, self._entries)

    def _wait_saves(self) -> None:
        if self._async is not None:
            collective.on_every_rank(self._coord, self._async.wait)

    def close(self) -> None:
        """Wait for any in-flight save and copy, then release resources (the writer threads'
        coordinator too: a later save makes a new one); before the process group goes."""
        if self._async is not None:
            collective.on_every_rank(self._coord, self._async.close)
        try:
            self._tiers.close(self._coord)
        finally:
            self._preempt.close()
            if self._bg is not None:  # every rank's writer is done with it: release it
                bg, self._bg, self._bg_released = self._bg, None, True
                getattr(bg, "close", lambda: None)()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

