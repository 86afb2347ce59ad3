"""What to keep: the last N, the best K, milestones, and whatever is protected.

A stateless policy over plain records; deletion decisions depend only on the records
passed in, so a resumed run decides exactly as the original would have.
:meth:`Retention.explain` gives every reason a checkpoint is kept (none: it goes).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import ConfigurationError
from .monitor import Monitor

__all__ = ["Record", "Retention", "ranked", "best_record", "check_limit"]


@dataclass(frozen=True)
class Record:
    """What the policies know of one committed checkpoint.

    ``seq`` orders commits (higher is newer); ``score`` is the monitored value or ``None``
    when unranked; ``managed`` is False for checkpoints the manager did not write;
    ``same_settings`` is False for those a manager with other retention settings wrote
    (kept: one manager never deletes another's work). ``step``, ``epoch`` and ``time``
    (checkpoint time, seconds) feed the milestones.
    """

    name: str
    seq: int
    score: float | None = None
    managed: bool = True
    step: int | None = None
    epoch: int | None = None
    time: float = 0.0
    same_settings: bool = True

    @property
    def deletable(self) -> bool:
        """Written by this engine's manager under the same retention settings."""
        return self.managed and self.same_settings


def ranked(records: Sequence[Record], monitor: Monitor | None) -> list[Record]:
    """The records with a finite score, best first (ties: the older first); none without a
    monitor."""
    if monitor is None:
        return []
    scored = [r for r in records if r.score is not None and math.isfinite(r.score)]
    return sorted(scored, key=lambda r: (monitor.sort_key(r.score), r.seq))


def best_record(records: Sequence[Record], monitor: Monitor | None) -> Record | None:
    """The best ranked record (ties: the older one), or ``None`` when none is ranked."""
    order = ranked(records, monitor)
    return order[0] if order else None


def check_limit(name: str, value: object) -> None:
    """Refuse a retention limit (``keep_last=``, ``keep_best=``, ...) that is not an int >= 0
    or ``None``; the message names the option and the bad value.

    Raises:
        ConfigurationError: on a bad value.
    """
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"{name} must be an int >= 0 or None, got {value!r}")


@dataclass(frozen=True)
class Retention:
    """Kept = last ``keep_last`` ∪ best ``keep_best`` ∪ milestones ∪ protected, when
    ``keep_last`` or ``keep_best`` is set (else everything is kept).

    Milestones (Orbax's ``keep_period`` / ``keep_time_interval``): a step multiple of
    ``keep_every_n_steps``, an epoch multiple of ``keep_every_n_epochs``, the first
    checkpoint of each window of ``keep_every_seconds`` of checkpoint time. Never deleted:
    the newest record, the best one, names in ``protected``, records not managed by the
    engine and records written under other retention settings.
    """

    keep_last: int | None = None
    keep_best: int | None = None
    keep_every_n_steps: int | None = None
    keep_every_n_epochs: int | None = None
    keep_every_seconds: float | None = None

    def __post_init__(self) -> None:
        check_limit("keep_last", self.keep_last)
        check_limit("keep_best", self.keep_best)
        for name in ("keep_every_n_steps", "keep_every_n_epochs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, got {v!r}")
        t = self.keep_every_seconds
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise ConfigurationError(f"keep_every_seconds must be a positive number or None, got {t!r}")

    @property
    def deletes(self) -> bool:
        """Whether this policy ever deletes anything."""
        return self.keep_last is not None or self.keep_best is not None

    def settings(self) -> dict[str, int | float | None]:
        """The options, as recorded in each manifest the manager writes."""
        return {"keep_last": self.keep_last, "keep_best": self.keep_best,
                "keep_every_n_steps": self.keep_every_n_steps,
                "keep_every_n_epochs": self.keep_every_n_epochs,
                "keep_every_seconds": self.keep_every_seconds}

    def explain(self, records: Sequence[Record], monitor: Monitor | None,
                protected: Collection[str] = ()) -> dict[str, list[str]]:
        """Every record's name -> every reason it is kept (an empty list: it is deleted)."""
        why: dict[str, list[str]] = {r.name: [] for r in records}
        if not self.deletes:
            for r in records:
                why[r.name].append("keep_last and keep_best are None: everything is kept")
            return why
        by_age = sorted(records, key=lambda r: r.seq)
        for r in records:
            if not r.managed:
                why[r.name].append("not written by this engine")
            elif not r.same_settings:
                why[r.name].append("written with other retention settings")
            if r.name in protected:
                why[r.name].append("restored from")
        if by_age:
            why[by_age[-1].name].insert(0, "latest")
        best = best_record(records, monitor)
        if best is not None and monitor is not None:
            why[best.name].append("best")
        mine = [r for r in by_age if r.deletable]
        if self.keep_last:
            for r in mine[-self.keep_last:]:
                why[r.name].append(f"last {self.keep_last}")
        if self.keep_best and monitor is not None:
            for r in ranked(mine, monitor)[:self.keep_best]:
                why[r.name].append(f"top {self.keep_best} by {monitor.metric}")
        self._milestones(mine, why)
        return why

    def _milestones(self, records: Sequence[Record], why: dict[str, list[str]]) -> None:
        for n, attr, what in ((self.keep_every_n_steps, "step", "step"),
                              (self.keep_every_n_epochs, "epoch", "epoch")):
            for r in records if n else ():
                v = getattr(r, attr)
                if v is not None and v % n == 0:
                    why[r.name].append(f"{what} multiple of {n}")
        t = self.keep_every_seconds
        if t:
            seen: set[int] = set()
            for r in sorted(records, key=lambda r: (r.time, r.seq)):
                window = math.floor(r.time / t) if math.isfinite(r.time) else 0
                if window not in seen:
                    seen.add(window)
                    why[r.name].append(f"first in its {t:g} s window")

    def kept(self, records: Sequence[Record], monitor: Monitor | None,
             protected: Collection[str] = ()) -> set[str]:
        """Names of the records to keep."""
        return {n for n, reasons in self.explain(records, monitor, protected).items() if reasons}

    def to_delete(self, records: Sequence[Record], monitor: Monitor | None,
                  protected: Collection[str] = ()) -> list[str]:
        """Names to delete, oldest first."""
        keep = self.kept(records, monitor, protected)
        return [r.name for r in sorted(records, key=lambda r: r.seq) if r.name not in keep]
