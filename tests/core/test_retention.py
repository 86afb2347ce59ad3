"""Retention: table cases of the policy over plain records."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from checkpointer.errors import ConfigurationError
from checkpointer.monitor import Monitor
from checkpointer.retention import Record, Retention, best_record, ranked

NAN = float("nan")
LOSS = Monitor.create("val_loss")
ACC = Monitor.create("val_acc")


def _records(scores: list[Any], unmanaged: tuple[int, ...] = ()) -> list[Record]:
    return [Record(f"c{i}", i, s, i not in unmanaged) for i, s in enumerate(scores)]


# (keep_last, keep_best, monitor, scores, protected, unmanaged, expected kept indices)
CASES = [
    (None, None, LOSS, [0.5, 0.4, 0.3], (), (), {0, 1, 2}),  # both unset: keep all
    (1, None, None, [None] * 4, (), (), {3}),
    (2, None, None, [None] * 4, (), (), {2, 3}),
    (0, None, None, [None] * 3, (), (), {2}),  # the newest always stays
    (0, 0, LOSS, [0.1, 0.5, 0.6], (), (), {0, 2}),  # newest and best always stay
    (1, None, LOSS, [0.1, 0.5, 0.6], (), (), {0, 2}),
    (None, 1, LOSS, [0.5, 0.1, 0.6], (), (), {1, 2}),
    (None, 2, LOSS, [0.5, 0.1, 0.3, 0.9], (), (), {1, 2, 3}),
    (None, 2, ACC, [0.5, 0.1, 0.3, 0.2], (), (), {0, 2, 3}),
    (1, 1, LOSS, [0.2, 0.2, 0.3], (), (), {0, 2}),  # tie: the older is the best
    (None, 1, LOSS, [NAN, 0.5, NAN], (), (), {1, 2}),  # NaN never best
    (None, 2, LOSS, [NAN, NAN, NAN], (), (), {2}),
    (None, 1, LOSS, [None, 0.7, None, 0.8], (), (), {1, 3}),
    (1, None, LOSS, [0.9, 0.8, 0.7], ("c0",), (), {0, 2}),  # protected (restored from)
    (1, None, None, [None] * 4, (), (0, 1), {0, 1, 3}),  # not written by the engine
    (1, 1, LOSS, [0.1, 0.9, 0.8], (), (0,), {0, 2}),  # foreign best is kept, ranks too
    (2, 1, LOSS, [0.3, 0.1, 0.9, 0.8, 0.7], (), (), {1, 3, 4}),
]


@pytest.mark.parametrize(
    ("keep_last", "keep_best", "monitor", "scores", "protected", "unmanaged", "kept"), CASES
)
def test_kept(
    keep_last: int | None,
    keep_best: int | None,
    monitor: Monitor | None,
    scores: list[Any],
    protected: tuple[str, ...],
    unmanaged: tuple[int, ...],
    kept: set[int],
) -> None:
    records = _records(scores, unmanaged)
    r = Retention(keep_last, keep_best)
    want = {f"c{i}" for i in kept}
    assert r.kept(records, monitor, protected) == want
    deleted = r.to_delete(records, monitor, protected)
    assert deleted == [rec.name for rec in records if rec.name not in want]  # oldest first


def test_order_comes_from_seq_not_position() -> None:
    records = [Record("new", 5), Record("old", 1), Record("mid", 3)]
    assert Retention(keep_last=1).to_delete(records, None) == ["old", "mid"]


@pytest.mark.parametrize(
    ("scores", "monitor", "best"),
    [
        ([0.5, 0.1, 0.3], LOSS, "c1"),
        ([0.5, 0.1, 0.3], ACC, "c0"),
        ([0.2, 0.2], LOSS, "c0"),
        ([NAN, None], LOSS, None),
        ([], LOSS, None),
        ([0.5, 0.1], None, None),
        ([NAN, 0.4, float("-inf")], LOSS, "c1"),
    ],
)
def test_best_record(scores: list[Any], monitor: Monitor | None, best: str | None) -> None:
    rec = best_record(_records(scores), monitor)
    assert (rec.name if rec else None) == best


@given(st.lists(st.sampled_from([None, NAN, float("inf"), -1.0, 0.1, 0.2, 0.2, 0.5]), max_size=8),
       st.sampled_from([LOSS, ACC]))
def test_ranked_is_the_finite_scores_best_first_older_first_on_ties(scores: list[Any],
                                                                    monitor: Monitor) -> None:
    records = _records(scores)
    order = ranked(records, monitor)
    assert sorted(r.name for r in order) == sorted(
        r.name for r in records if r.score is not None and math.isfinite(r.score))
    keys = [(monitor.sort_key(r.score), r.seq) for r in order]
    assert keys == sorted(keys)
    assert best_record(records, monitor) == (order[0] if order else None)
    assert ranked(records, None) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": -1},
        {"keep_best": -2},
        {"keep_last": 1.5},
        {"keep_last": True},
        {"keep_best": "3"},
    ],
)
def test_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Retention(**kwargs)
