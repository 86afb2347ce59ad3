"""What to keep: the last N, the best K, and whatever is protected.

A stateless policy over plain records; deletion decisions depend only on the records
passed in, so a resumed run decides exactly as the original would have.
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
    when unranked; ``managed`` is False for checkpoints the manager did not write.
    """

    name: str
    seq: int
    score: float | None = None
    managed: bool = True


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
    """Kept = last ``keep_last`` ∪ best ``keep_best`` ∪ protected; both ``None`` keeps all.

    Never deleted: the newest record, the best one, names in ``protected`` and records
    not managed by the engine.
    """

    keep_last: int | None = None
    keep_best: int | None = None

    def __post_init__(self) -> None:
        check_limit("keep_last", self.keep_last)
        check_limit("keep_best", self.keep_best)

    def kept(self, records: Sequence[Record], monitor: Monitor | None,
             protected: Collection[str] = ()) -> set[str]:
        """Names of the records to keep."""
        if self.keep_last is None and self.keep_best is None:
            return {r.name for r in records}
        by_age = sorted(records, key=lambda r: r.seq)
        keep = {r.name for r in records if not r.managed} | set(protected)
        if by_age:
            keep.add(by_age[-1].name)
        best = best_record(records, monitor)
        if best is not None:
            keep.add(best.name)
        managed = [r for r in by_age if r.managed]
        if self.keep_last:
            keep |= {r.name for r in managed[-self.keep_last:]}
        if self.keep_best:
            keep |= {r.name for r in ranked(managed, monitor)[:self.keep_best]}
        return keep

    def to_delete(self, records: Sequence[Record], monitor: Monitor | None,
                  protected: Collection[str] = ()) -> list[str]:
        """Names to delete, oldest first."""
        keep = self.kept(records, monitor, protected)
        return [r.name for r in sorted(records, key=lambda r: r.seq) if r.name not in keep]
