"""Milestones (Orbax's keep_period / keep_time_interval) and explained retention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer import CheckpointManager
from checkpointer.errors import ConfigurationError
from checkpointer.monitor import Monitor
from checkpointer.retention import Record, Retention


def _recs(n: int, **kw: object) -> list[Record]:
    return [Record(f"c{i}", i, None, True, step=i * 10, epoch=i, time=100.0 * i) for i in range(n)]


def test_step_and_epoch_multiples_are_kept_forever() -> None:
    r = Retention(keep_last=1, keep_every_n_steps=30, keep_every_n_epochs=4)
    kept = r.kept(_recs(10), None)
    assert kept == {"c0", "c3", "c4", "c6", "c8", "c9"}
    why = r.explain(_recs(10), None)
    assert why["c3"] == ["step multiple of 30"] and why["c8"] == ["epoch multiple of 4"]
    assert why["c0"] == ["step multiple of 30", "epoch multiple of 4"]
    assert why["c9"] == ["latest", "last 1", "step multiple of 30"] and why["c5"] == []


def test_the_first_checkpoint_of_each_time_window_is_kept() -> None:
    recs = [Record(f"c{i}", i, None, True, time=t) for i, t in enumerate([0.0, 50.0, 250.0, 260.0, 410.0, 420.0])]
    kept = Retention(keep_last=1, keep_every_seconds=200).kept(recs, None)
    assert kept == {"c0", "c2", "c4", "c5"}  # windows [0,200) [200,400) [400,600); c5 latest


def test_milestones_alone_delete_nothing() -> None:
    r = Retention(keep_every_n_steps=1000)
    assert r.to_delete(_recs(5), None) == []
    assert r.explain(_recs(2), None)["c0"] == ["keep_last and keep_best are None: everything is kept"]


@pytest.mark.parametrize("kw", [{"keep_every_n_steps": 0}, {"keep_every_n_epochs": -1},
                                {"keep_every_n_steps": True}, {"keep_every_seconds": 0},
                                {"keep_every_seconds": float("inf")}, {"keep_every_seconds": "60"}])
def test_bad_milestones_are_configuration_errors(tmp_path: Path, kw: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=next(iter(kw))):
        CheckpointManager(tmp_path, keep_last=1, **kw)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 50), st.one_of(st.none(), st.floats(0, 1)), st.booleans()),
                min_size=1, max_size=25),
       st.sampled_from([None, 0, 1, 3]), st.sampled_from([None, 0, 1, 2]),
       st.sampled_from([None, 5, 7]), st.sampled_from([None, 30.0]))
def test_explain_matches_kept_and_every_milestone_survives(rows: list[tuple[int, float | None, bool]],
                                                            last: int | None, best: int | None,
                                                            every: int | None, window: float | None) -> None:
    recs = [Record(f"c{i}", i, score, managed, step=step, time=10.0 * step)
            for i, (step, score, managed) in enumerate(rows)]
    r = Retention(last, best, keep_every_n_steps=every, keep_every_seconds=window)
    mon = Monitor.create("m", "min")
    why = r.explain(recs, mon)
    assert {n for n, reasons in why.items() if reasons} == r.kept(recs, mon)
    gone = set(r.to_delete(recs, mon))
    assert recs[-1].name not in gone and all(x.managed for x in recs if x.name in gone)
    if every:
        assert not {x.name for x in recs if x.managed and x.step is not None and x.step % every == 0} & gone


def test_the_manager_keeps_milestones_across_a_resume(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1, every_n_epochs=None, every_n_steps=50,
                            keep_every_n_steps=200)
    for step in range(50, 501, 50):
        mgr.step_end(step, {"w": np.full(1, step)})
    again = CheckpointManager(tmp_path, keep_last=1, every_n_steps=50, keep_every_n_steps=200)
    again.step_end(550, {"w": np.zeros(1)})
    assert [c.step for c in again.checkpoints] == [200, 400, 550]
