"""The manager's decision, and the typed data it decides with.

- :class:`Planner`: once the schedule says "save here", whether to save (the monitor's score,
  ``save_best_only``) and under which name, as a :class:`SavePlan`;
- :class:`SavePlan`: what one save writes, decided before any state is extracted; made once
  (on rank 0 when there are several processes) and sent to every rank as plain data;
- :class:`Scored`: a committed checkpoint beside its monitored value, scored once, when it
  was saved or loaded, so that ranking, retention and ``restore("best")`` never re-extract it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import CheckpointError, ConfigurationError, MetricError
from .hints import did_you_mean
from .index import INDEX_NAME, Entry, decode_entry, encode_entry, read_index_meta
from .info import CheckpointInfo
from .monitor import Monitor, Score, to_float
from .naming import default_name, format_name, template_fields
from .retention import Record, ranked
from .storage import Store

__all__ = ["Planner", "SavePlan", "Scored", "CheckpointWarning", "MetricValue", "clean_metrics",
           "encode_plan", "decode_plan", "restore_order", "recorded_monitor",
           "encode_scored", "decode_scored", "kept_index_config", "warn_no_step_schedule"]

log = logging.getLogger("checkpointer")
MetricValue = int | float | str


class CheckpointWarning(UserWarning):
    """A save went ahead without something it should have had (e.g. the monitored metric)."""


@dataclass(frozen=True)
class Planner:
    """The save decision after the schedule: the monitor's score (its NaN policy included),
    the ``save_best_only`` test, the name.

    Stateless: the next ``seq`` and the best score so far are passed in (derived from the
    committed checkpoints), so a resumed run decides as the original would have.

    Raises:
        ConfigurationError: an invalid ``filename`` template, at construction.
    """

    monitor: Monitor | None
    filename: str | None = None
    save_best_only: bool = False
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.filename is not None:
            template_fields(self.filename)

    def plan(self, step: int | None, epoch: int | None, metrics: Mapping[str, Any] | None,
             reason: str, *, seq: int, best: Callable[[], float | None],
             force: bool = False) -> SavePlan | None:
        """The plan of a save here, or ``None`` when the monitor says no (why is logged).

        ``best()`` gives the best score so far (called only for ``save_best_only``);
        ``force``: an explicit save, which neither ``save_best_only`` nor
        ``nan_policy="skip"`` stops.

        Raises:
            MetricError: a metric that is not a number, or NaN/inf under ``nan_policy="raise"``.
        """
        score = self.score(metrics)
        where = f"epoch {epoch}" if epoch is not None else f"step {step}"
        if score.skip and not force:
            log.info("%s: not saved: %s", where, score.skip)
            return None
        if self.save_best_only and not force and self.monitor is not None:
            so_far = best()
            if not self.monitor.is_improvement(score.value, so_far):
                _not_improved(where, self.monitor, score.value, so_far)
                return None
        log.debug("%s: saving (%s)", where, reason)
        clean = clean_metrics(metrics)
        name = (format_name(self.filename, epoch=epoch, step=step, metrics=clean)
                if self.filename else default_name(epoch=epoch, step=step, seq=seq))
        return SavePlan(name, seq, step, epoch, clean, score.value, float(self.clock()), reason)

    def scored(self, entry: Entry) -> Scored:
        """A committed checkpoint read from storage, scored by its recorded metrics: the one
        time it is scored (a new one carries its plan's score)."""
        if self.monitor is None:
            return Scored(entry, None)
        try:
            return Scored(entry, self.monitor.score(entry.info.metrics).value)
        except MetricError:  # not a number, or NaN under "raise": kept, never ranked
            return Scored(entry, None)

    def score(self, metrics: Mapping[str, Any] | None) -> Score:
        """A new save point's score (:meth:`Monitor.score` judges NaN/inf); a missing metric
        warns, and skips the save under ``save_best_only``."""
        mon = self.monitor
        if mon is None:
            return Score(None)
        score = mon.score(metrics)
        if not score.missing:
            return score
        hint = did_you_mean(mon.metric, [str(k) for k in metrics or {}])
        msg = (f"monitored metric {mon.metric!r} is missing from the metrics "
               f"({sorted(metrics or {})}){'; ' + hint if hint else ''}; this save point is not ranked")
        log.warning(msg)
        # 7: past plan, the manager's _decide, _run, _save_point and public method: at its caller
        warnings.warn(msg, CheckpointWarning, stacklevel=7)
        return Score(None, f"{mon.metric!r} is missing") if self.save_best_only else score


@dataclass(frozen=True)
class SavePlan:
    """One save, decided: its name, its place in the commit order and what it records.

    ``seq`` orders commits (higher is newer); ``score`` is the monitored value (``None``: not
    ranked; NaN/inf under ``nan_policy="worst"``, ranked worst); ``reason`` says why it saves
    (the schedule's reason, or an explicit save). It crosses ranks through :meth:`encode` and
    :meth:`decode`.

    Example::

        plan = SavePlan("epoch-000003", 2, None, 3, {"val_loss": 0.4}, 0.4, 1.7e9, "epoch 3")
        assert SavePlan.decode(plan.encode()) == plan
    """

    name: str
    seq: int
    step: int | None
    epoch: int | None
    metrics: Mapping[str, MetricValue]
    score: float | None
    time: float
    reason: str

    @property
    def record(self) -> Record:
        """What retention knows of this save once it has committed."""
        return Record(self.name, self.seq, self.score, True)

    def info(self, url: str, nbytes: int) -> CheckpointInfo:
        """The checkpoint's info, once it is at ``url`` with ``nbytes`` written."""
        return CheckpointInfo(self.name, url, self.step, self.epoch, dict(self.metrics), self.time, nbytes)

    def encode(self) -> dict[str, Any]:
        """Plain msgpack-able data, one key per field."""
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["metrics"] = dict(self.metrics)
        return row

    @classmethod
    def decode(cls, row: Any) -> SavePlan:
        """The plan :meth:`encode` gave, from data that crossed a process boundary.

        Raises:
            CheckpointError: ``row`` is not a dict of exactly the plan's fields with valid
                values (a rank running another version of the engine, a damaged message).
        """
        if not isinstance(row, dict) or set(row) != set(_CHECKS):
            got = sorted(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise CheckpointError(f"malformed save plan: expected the fields {sorted(_CHECKS)}, got {got}")
        for name, valid in _CHECKS.items():
            if not valid(row[name]):
                raise CheckpointError(f"malformed save plan: {name}={row[name]!r}")
        return cls(**row)


def encode_plan(plan: SavePlan | None) -> dict[str, Any] | None:
    """:meth:`SavePlan.encode`, ``None`` (no save) passing through."""
    return None if plan is None else plan.encode()


def decode_plan(row: Any) -> SavePlan | None:
    """:meth:`SavePlan.decode`, ``None`` (no save) passing through."""
    return None if row is None else SavePlan.decode(row)


def _optional_int(v: Any) -> bool:
    return v is None or type(v) is int


def _metrics_ok(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and k and type(x) in (int, float, str) for k, x in v.items())


# bool is an int to isinstance, never a step or a seq: exact types
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str) and v != "",
    "seq": lambda v: type(v) is int and v >= 0,
    "step": _optional_int,
    "epoch": _optional_int,
    "metrics": _metrics_ok,
    "score": lambda v: v is None or type(v) is float,
    "time": lambda v: type(v) is float,
    "reason": lambda v: isinstance(v, str),
}


@dataclass(frozen=True)
class Scored:
    """A committed checkpoint and its monitored value (``None``: not ranked), scored once."""

    entry: Entry
    score: float | None

    @property
    def info(self) -> CheckpointInfo:
        """The checkpoint's info."""
        return self.entry.info

    @property
    def record(self) -> Record:
        """What the retention policy knows of it."""
        return Record(self.entry.info.name, self.entry.seq, self.score, self.entry.managed)


def encode_scored(entries: Sequence[Scored]) -> Any:
    """Rank 0's entries with rank 0's scores, for the other ranks: they never score."""
    return [[encode_entry(s.entry), s.score] for s in entries]


def decode_scored(store: Store, rows: Any) -> list[Scored]:
    """Rank 0's entries (:func:`encode_scored`) on another rank."""
    ok = [r for r in rows if isinstance(r, list) and len(r) == 2 and (r[1] is None or type(r[1]) is float)]
    return [Scored(e, r[1]) for r in ok if (e := decode_entry(store, r[0])) is not None]


def restore_order(entries: Sequence[Scored], which: str | int, monitor: Monitor | None,
                  recorded: Callable[[], Monitor | None] = lambda: None) -> tuple[list[Scored], bool]:
    """The checkpoints that ``restore(which)`` tries, in order, and whether it may fall back
    past the first: ``"latest"`` newest first, ``"best"`` best first (ranked ones only), a
    step number or a name (no fallback). ``"best"`` without a ``monitor`` ranks by the one
    ``recorded()`` finds (the directory's: see :func:`recorded_monitor`), and logs it.

    Raises:
        ConfigurationError: ``"best"`` with no monitor given or recorded, or ``which`` of
            another kind.
    """
    if which == "latest":
        return list(reversed(entries)), True
    if which == "best":
        if monitor is None:
            monitor = recorded()
            if monitor is None:
                raise ConfigurationError(
                    "restore('best') needs a monitor to rank by, and this directory records "
                    "none: pass CheckpointManager(..., monitor='val_loss') (the metric's name)")
            log.info("restore('best'): ranking by monitor %r (mode=%r), which the directory "
                     "records", monitor.metric, monitor.mode)
            entries = [Planner(monitor).scored(s.entry) for s in entries]
        by_name = {s.info.name: s for s in entries}
        return [by_name[r.name] for r in ranked([s.record for s in entries], monitor)], True
    if isinstance(which, int) and not isinstance(which, bool):
        return [s for s in reversed(entries) if s.info.step == which], False
    if isinstance(which, str):
        return [s for s in entries if s.info.name == which], False
    raise ConfigurationError(f"restore() takes 'latest', 'best', a name or a step, got {which!r}")


def recorded_monitor(config: Mapping[str, Any], entries: Sequence[Scored]) -> Monitor | None:
    """The monitor a directory records: its index's (``config``, see
    :func:`~checkpointer.index.read_index_meta`), else the newest manifest's retention
    settings that name one; ``None`` when nothing does."""
    candidates: list[Any] = [config]
    for s in reversed(entries):
        try:
            candidates.append(json.loads(s.entry.settings or "{}"))
        except ValueError:  # "?": settings that were not a flat map
            continue
    for found in candidates:
        metric, mode = (found.get("monitor"), found.get("mode")) if isinstance(found, dict) else (None, None)
        if isinstance(metric, str) and metric and mode in ("min", "max"):
            return Monitor.create(metric, mode)
    return None


def kept_index_config(store: Store, listing: list[str], monitor: Monitor | None) -> dict[str, str]:
    """The monitor the index records, for a manager without one of its own to keep when it
    rewrites the index: ``restore("best")`` and ``checkpointer ls`` still rank by it."""
    if monitor is not None or INDEX_NAME not in listing:
        return {}
    meta = read_index_meta(store)
    return {k: meta[k] for k in ("monitor", "mode") if k in meta}


def warn_no_step_schedule(step: int) -> bool:
    """Warn that ``step_end`` cannot save (no step or time trigger); ``False``: warned."""
    msg = (f"step_end({step}) never saves: the schedule has no every_n_steps (and no "
           "every_seconds); pass CheckpointManager(..., every_n_steps=N) to save every N "
           "steps, or call epoch_end at the end of each epoch")
    log.warning(msg)
    warnings.warn(msg, CheckpointWarning, stacklevel=3)  # at step_end's caller
    return False


def _not_improved(where: str, monitor: Monitor, value: float | None, best: float | None) -> None:
    """Say why a ``save_best_only`` save point did not save: a NaN/inf (which never
    improves) as a warning, at the default log level; a value that did not beat the best
    (or the initial threshold) at info."""
    if value is not None and not math.isfinite(value):
        msg = (f"{where}: not saved: monitored metric {monitor.metric!r} is {value}, which never "
               "improves (save_best_only=True); pass nan_policy='raise' to stop on it, or "
               "nan_policy='skip' to skip such save points quietly")
        log.warning(msg)
        warnings.warn(msg, CheckpointWarning, stacklevel=7)  # as in Planner.score
        return
    beaten = [f"the best so far ({best})"] if best is not None and math.isfinite(best) else []
    if monitor.initial_value_threshold is not None:
        beaten.append(f"initial_value_threshold={monitor.initial_value_threshold}")
    delta = f" by more than min_delta={monitor.min_delta}" if monitor.min_delta else ""
    log.info("%s: not saved: %s=%s does not beat %s%s (mode=%r)", where, monitor.metric, value,
             " or ".join(beaten) or "anything", delta, monitor.mode)


def clean_metrics(metrics: Mapping[Any, Any] | None) -> dict[str, MetricValue]:
    """``metrics`` as the plain values a manifest records: str as given, integer counts as
    ``int`` (so that ``{batch:02d}`` formats), every other number as ``float``.

    Raises:
        MetricError: a name that is not a non-empty str, or a value that is not a number.
    """
    return {name: _metric_value(name, value) for name, value in (metrics or {}).items()}


def _metric_value(name: Any, value: Any) -> MetricValue:
    if not isinstance(name, str) or not name:
        raise MetricError(f"metric names must be non-empty str, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise MetricError(f"metric name {name!r} is not valid unicode") from None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        count = int(value)
        if not _INT_MIN <= count <= _UINT_MAX:
            raise MetricError(f"metric {name!r} is an integer of {count.bit_length()} bits, outside "
                              "the 64-bit integers a manifest records; pass it as a float")
        return count
    return to_float(name, value)


_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
