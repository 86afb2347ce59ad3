"""The manager's decision: the typed save plan, the planner, scoring once, the NaN policy."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpointer import CheckpointManager, CheckpointWarning
from checkpointer.errors import CheckpointError, MetricError
from checkpointer.index import Entry
from checkpointer.info import CheckpointInfo
from checkpointer.monitor import Monitor, Score
from checkpointer.plan import Planner, SavePlan, Scored, decode_plan, encode_plan, restore_order

NAN, INF = float("nan"), float("inf")

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
ints = st.integers(-(2**62), 2**62)
metric_values = st.one_of(ints, st.floats(allow_nan=True), st.text(max_size=10))
plans = st.builds(
    SavePlan, name=names, seq=st.integers(0, 2**62), step=st.none() | ints, epoch=st.none() | ints,
    metrics=st.dictionaries(names, metric_values, max_size=5),
    score=st.none() | st.floats(allow_nan=True), time=st.floats(allow_nan=False), reason=st.text(max_size=30))


def _wire(row: Any) -> Any:
    """What another rank receives: the row through msgpack, as the coordinators send it."""
    return msgpack.unpackb(msgpack.packb(row, use_bin_type=True), raw=False, strict_map_key=False)


def _same_plan(a: SavePlan, b: SavePlan) -> bool:
    """Equality in which NaN equals NaN (a NaN score or metric stays NaN across ranks)."""
    def key(x: Any) -> Any:
        return "nan" if isinstance(x, float) and math.isnan(x) else x
    return (a.encode().keys() == b.encode().keys()
            and all(key(getattr(a, f)) == key(getattr(b, f)) for f in a.encode() if f != "metrics")
            and {k: key(v) for k, v in a.metrics.items()} == {k: key(v) for k, v in b.metrics.items()})


@given(plans)
@settings(max_examples=200, deadline=None)
def test_a_plan_crosses_ranks_unchanged(plan: SavePlan) -> None:
    back = SavePlan.decode(_wire(plan.encode()))
    assert _same_plan(back, plan)
    assert type(back.seq) is int and (back.score is None or type(back.score) is float)
    assert decode_plan(_wire(encode_plan(plan))) is not None
    assert decode_plan(_wire(encode_plan(None))) is None  # "no save" crosses too


GOOD = SavePlan("epoch-000003", 2, None, 3, {"val_loss": 0.4, "n": 7, "tag": "x"}, 0.4, 12.5,
                "epoch 3").encode()


@pytest.mark.parametrize("change, why", [
    ({"seq": True}, "seq"),                  # bool is not a seq
    ({"seq": -1}, "seq"),
    ({"seq": 2.0}, "seq"),
    ({"name": ""}, "name"),
    ({"name": b"epoch"}, "name"),
    ({"step": "3"}, "step"),
    ({"epoch": False}, "epoch"),
    ({"score": 1}, "score"),                 # an int score never comes from Monitor.score
    ({"score": "0.4"}, "score"),
    ({"time": 12}, "time"),
    ({"time": None}, "time"),
    ({"reason": None}, "reason"),
    ({"metrics": [["val_loss", 0.4]]}, "metrics"),
    ({"metrics": {1: 0.4}}, "metrics"),
    ({"metrics": {"": 0.4}}, "metrics"),
    ({"metrics": {"val_loss": [0.4]}}, "metrics"),
    ({"metrics": {"val_loss": None}}, "metrics"),
    ({"metrics": {"ok": True}}, "metrics"),
])
def test_decode_refuses_a_malformed_field(change: dict[str, Any], why: str) -> None:
    with pytest.raises(CheckpointError, match=f"malformed save plan: {why}="):
        SavePlan.decode({**GOOD, **change})


@pytest.mark.parametrize("row", [
    None, [], "plan", list(GOOD.values()),                 # not a dict of fields
    {k: v for k, v in GOOD.items() if k != "reason"},      # a field missing
    {**GOOD, "extra": 1},                                  # a field too many
])
def test_decode_refuses_a_row_that_is_not_a_plan(row: Any) -> None:
    with pytest.raises(CheckpointError, match="malformed save plan: expected the fields"):
        SavePlan.decode(row)


@given(st.sampled_from(sorted(GOOD)), st.one_of(st.none(), st.booleans(), st.binary(max_size=3),
                                                st.lists(st.integers(), max_size=2)))
def test_decode_refuses_any_wrong_kind_of_value(field: str, bad: Any) -> None:
    if field in ("step", "epoch", "score") and bad is None:
        return  # None is a valid step, epoch and score
    with pytest.raises(CheckpointError, match=f"{field}="):
        SavePlan.decode({**GOOD, field: bad})


# -- the NaN policy goes through Monitor.score, once per save point -------------------

VALUES = st.sampled_from([0.1, 2.5, -3.0, NAN, INF, -INF])
POLICIES = st.sampled_from(["worst", "skip", "raise"])


def _plan(planner: Planner, value: float | None, force: bool = False) -> SavePlan | None:
    metrics = {} if value is None else {"val_loss": value}
    return planner.plan(None, 1, metrics, "epoch 1", seq=0, best=lambda: None, force=force)


@given(POLICIES, VALUES, st.booleans())
def test_the_planner_decides_by_monitor_score(policy: str, value: float, force: bool) -> None:
    planner = Planner(Monitor.create("val_loss", nan_policy=policy))
    try:
        score = planner.monitor.score({"val_loss": value})  # type: ignore[union-attr]
    except MetricError:
        with pytest.raises(MetricError, match="nan_policy='raise'"):
            _plan(planner, value, force)
        assert policy == "raise" and not math.isfinite(value)
        return
    plan = _plan(planner, value, force)
    if score.skip and not force:
        assert plan is None and policy == "skip"
    else:
        assert plan is not None and list(plan.metrics) == ["val_loss"]
        assert plan.score == value or (math.isnan(value) and math.isnan(plan.score or 0.0))
        assert plan.score is score.value or plan.score == score.value  # the monitor's value
    assert (plan is None) == (policy == "skip" and not math.isfinite(value) and not force)


class ScriptedMonitor(Monitor):
    """A monitor whose verdict the test chooses: the planner must follow it, not judge NaN itself."""

    verdict = Score(None)

    def score(self, metrics: Any) -> Score:
        return self.verdict


@pytest.mark.parametrize("verdict, saved, score", [
    (Score(0.3), True, 0.3),
    (Score(NAN, "told to skip"), False, None),   # a skip that is not about NaN at all
    (Score(NAN), True, NAN),                     # NaN that the monitor lets through ranks worst
])
def test_the_planner_has_no_nan_policy_of_its_own(verdict: Score, saved: bool, score: float | None) -> None:
    monitor = ScriptedMonitor("val_loss", "min", nan_policy="skip")
    object.__setattr__(monitor, "verdict", verdict)
    plan = _plan(Planner(monitor), NAN)
    assert (plan is not None) == saved
    if plan is not None:
        assert plan.score == score or (math.isnan(plan.score or 0.0) and math.isnan(score or 0.0))


def test_a_missing_metric_warns_at_the_callers_line(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", save_best_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mgr.epoch_end(1, {"v": 1}, metrics={"loss": 0.1}) is None
    assert [w.category for w in caught] == [CheckpointWarning]
    assert caught[0].filename == __file__  # stacklevel points past the engine


# -- every checkpoint is scored once -----------------------------------------------------

@pytest.fixture
def score_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ``Monitor.score`` call's metrics, in order."""
    calls: list[Any] = []
    real = Monitor.score

    def counting(self: Monitor, metrics: Any) -> Score:
        calls.append(dict(metrics or {}))
        return real(self, metrics)
    monkeypatch.setattr(Monitor, "score", counting)
    return calls


@pytest.mark.parametrize("async_save", [False, True])
def test_each_save_scores_one_checkpoint_once(tmp_path: Path, score_calls: list[Any],
                                              async_save: bool) -> None:
    losses = [0.9, 0.5, 0.7, 0.3, 0.6, 0.4, 0.8]
    with CheckpointManager(tmp_path, monitor="val_loss", keep_best=2, keep_last=2,
                           save_best_only=False, async_save=async_save) as mgr:
        for epoch, loss in enumerate(losses, start=1):
            mgr.epoch_end(epoch, {"v": epoch}, metrics={"val_loss": loss})
            assert score_calls[-1] == {"val_loss": loss}
            assert len(score_calls) == epoch  # this save point only: none of the kept ones again
            mgr.best, mgr.checkpoints  # noqa: B018 - reading them scores nothing
        mgr.wait()
        assert mgr.best is not None and mgr.best.epoch == 4
        assert mgr.restore("best").state == {"v": 4}
    assert len(score_calls) == len(losses)
    assert [c.epoch for c in mgr.checkpoints] == [4, 6, 7]  # best 2 (0.3, 0.4) ∪ last 2

    score_calls.clear()
    reopened = CheckpointManager(tmp_path, monitor="val_loss", keep_best=2, keep_last=2)
    assert sorted(c["val_loss"] for c in score_calls) == [0.3, 0.4, 0.8]  # once each, at opening
    reopened.save({"v": 8}, metrics={"val_loss": 0.1})
    assert reopened.best is not None and reopened.best.metrics == {"val_loss": 0.1}
    assert len(score_calls) == 4


def test_save_best_only_compares_with_the_stored_scores(tmp_path: Path, score_calls: list[Any]) -> None:
    mgr = CheckpointManager(tmp_path, monitor="acc", save_best_only=True, keep_best=1)
    saved = [mgr.epoch_end(e, {"v": e}, metrics={"acc": a}) is not None
             for e, a in enumerate([0.5, 0.4, 0.7, 0.7, 0.9], start=1)]
    assert saved == [True, False, True, False, True]  # ties keep the older checkpoint
    assert len(score_calls) == 5


def _scored(name: str, seq: int, score: float | None, step: int | None = None) -> Scored:
    info = CheckpointInfo(name, f"mem://{name}", step, None, {}, float(seq), 1)
    return Scored(Entry(info, seq, True), score)


@pytest.mark.parametrize("which, expected, fallback", [
    ("latest", ["d", "c", "b", "a"], True),
    ("best", ["a", "c", "b"], True),       # finite scores only, best first, ties: older first
    (7, ["c"], False),
    ("b", ["b"], False),
    ("zz", [], False),
])
def test_restore_order(which: str | int, expected: list[str], fallback: bool) -> None:
    entries = [_scored("a", 0, 0.2), _scored("b", 1, 0.5), _scored("c", 2, 0.2, step=7),
               _scored("d", 3, NAN)]
    got, may_fall_back = restore_order(entries, which, Monitor.create("val_loss"))
    assert [s.info.name for s in got] == expected
    assert may_fall_back is fallback
