"""CheckpointManager semantics (DESIGN section 4): schedule -> monitor -> save -> retention."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from checkpointer import CheckpointManager, CheckpointWarning
from checkpointer.errors import ConfigurationError, MetricError

NAN = float("nan")


class Factory:
    """A state factory that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"w": np.full(2, self.calls, np.float32), "calls": self.calls}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _names(mgr: CheckpointManager) -> list[str]:
    return [c.name for c in mgr.checkpoints]


def test_state_callable_only_called_when_saving(tmp_path: Path) -> None:
    state = Factory()
    mgr = CheckpointManager(tmp_path, every_n_epochs=2)
    assert mgr.epoch_end(1, state) is None
    assert state.calls == 0
    info = mgr.epoch_end(2, state)
    assert info is not None and state.calls == 1
    assert mgr.restore().state["calls"] == 1
    assert mgr.step_end(5, state) is None and state.calls == 1  # no step schedule


def test_save_best_only_with_step_end(tmp_path: Path) -> None:
    state = Factory()
    mgr = CheckpointManager(
        tmp_path, monitor="val_loss", save_best_only=True, every_n_epochs=None, every_n_steps=10
    )
    saved = []
    for step, loss in [(5, 0.1), (10, 0.5), (20, 0.6), (30, 0.4), (40, 0.4), (50, NAN), (60, 0.3)]:
        info = mgr.step_end(step, state, metrics={"val_loss": loss})
        saved.append(info.step if info else None)
    assert saved == [None, 10, None, 30, None, None, 60]
    assert state.calls == 3  # only the three saves built the state
    assert mgr.best is not None and mgr.best.step == 60


@pytest.mark.parametrize(
    ("mode", "min_delta", "threshold", "values", "saved"),
    [
        ("min", 0.0, None, [0.5, 0.5, 0.4], [True, False, True]),  # ties keep the older
        ("max", 0.0, None, [0.5, 0.5, 0.6], [True, False, True]),
        ("min", 0.1, None, [0.5, 0.45, 0.35], [True, False, True]),
        ("min", 0.0, 0.3, [0.5, 0.3, 0.2], [False, False, True]),
        ("max", 0.0, 0.9, [0.5, 0.95, 0.93], [False, True, False]),
    ],
)
def test_improvement_options(
    tmp_path: Path,
    mode: str,
    min_delta: float,
    threshold: float | None,
    values: list[float],
    saved: list[bool],
) -> None:
    mgr = CheckpointManager(
        tmp_path,
        monitor="score",
        mode=mode,
        min_delta=min_delta,
        initial_value_threshold=threshold,
        save_best_only=True,
    )
    got = [
        mgr.epoch_end(e, {"e": e}, metrics={"score": v}) is not None
        for e, v in enumerate(values, start=1)
    ]
    assert got == saved


def test_missing_metric_warns_and_never_overwrites_best(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", save_best_only=True, filename="best")
    assert mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": 0.3}) is not None
    with pytest.warns(CheckpointWarning, match="val_loss"):
        assert mgr.epoch_end(2, {"v": 2}, metrics={"loss": 0.1}) is None
    with pytest.warns(CheckpointWarning):
        assert mgr.epoch_end(3, {"v": 3}) is None
    assert mgr.restore("best").state == {"v": 1}
    assert mgr.best is not None and mgr.best.metrics == {"val_loss": 0.3}


def test_missing_metric_without_save_best_only_is_saved_unranked(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", keep_best=1, keep_last=1)
    mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": 0.3})
    with pytest.warns(CheckpointWarning):
        info = mgr.epoch_end(2, {"v": 2}, metrics={"acc": 0.9})
    assert info is not None
    with pytest.warns(CheckpointWarning):
        mgr.epoch_end(3, {"v": 3})
    assert mgr.best is not None and mgr.best.epoch == 1
    assert _names(mgr) == ["epoch-000001", "epoch-000003"]  # the best is never deleted


@pytest.mark.parametrize("bad", [NAN, float("inf"), float("-inf"), np.float32("nan")])
def test_nan_policy_worst(tmp_path: Path, bad: Any) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", keep_best=1, keep_last=1)
    assert mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": bad}) is not None
    assert mgr.best is None
    mgr.epoch_end(2, {"v": 2}, metrics={"val_loss": 0.9})
    mgr.epoch_end(3, {"v": 3}, metrics={"val_loss": bad})
    assert mgr.best is not None and mgr.best.epoch == 2
    assert _names(mgr) == ["epoch-000002", "epoch-000003"]


def test_nan_policy_worst_with_save_best_only(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", save_best_only=True)
    assert mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": NAN}) is None
    assert mgr.epoch_end(2, {"v": 2}, metrics={"val_loss": 0.5}) is not None
    assert mgr.epoch_end(3, {"v": 3}, metrics={"val_loss": NAN}) is None
    assert mgr.epoch_end(4, {"v": 4}, metrics={"val_loss": 0.4}) is not None


def test_nan_policy_skip(tmp_path: Path) -> None:
    state = Factory()
    mgr = CheckpointManager(tmp_path, monitor="val_loss", nan_policy="skip")
    assert mgr.epoch_end(1, state, metrics={"val_loss": NAN}) is None
    assert mgr.step_end(1, state, metrics={"val_loss": NAN}) is None
    assert state.calls == 0 and mgr.checkpoints == []
    assert mgr.epoch_end(2, state, metrics={"val_loss": 0.5}) is not None


def test_nan_policy_raise(tmp_path: Path) -> None:
    state = Factory()
    mgr = CheckpointManager(tmp_path, monitor="val_loss", nan_policy="raise")
    with pytest.raises(MetricError, match="val_loss"):
        mgr.epoch_end(1, state, metrics={"val_loss": NAN})
    with pytest.raises(MetricError):
        mgr.save(state, metrics={"val_loss": float("inf")})
    assert state.calls == 0 and mgr.checkpoints == []


def test_restarted_run_never_overwrites_a_better_best(tmp_path: Path) -> None:
    opts: dict[str, Any] = {"monitor": "val_loss", "save_best_only": True, "filename": "best"}
    first = CheckpointManager(tmp_path, **opts)
    assert first.epoch_end(1, {"v": 1}, metrics={"val_loss": 0.2}) is not None
    again = CheckpointManager(tmp_path, **opts)  # the run restarts
    assert again.epoch_end(2, {"v": 2}, metrics={"val_loss": 0.5}) is None
    assert again.epoch_end(3, {"v": 3}, metrics={"val_loss": 0.2}) is None  # a tie
    assert again.restore("best").state == {"v": 1}
    assert again.epoch_end(4, {"v": 4}, metrics={"val_loss": 0.1}) is not None
    assert CheckpointManager(tmp_path, **opts).restore("best").state == {"v": 4}
    assert _names(again) == ["best"]


def test_save_ignores_schedule_and_save_best_only_but_is_ranked(tmp_path: Path) -> None:
    mgr = CheckpointManager(
        tmp_path, monitor="val_loss", save_best_only=True, every_n_epochs=None, keep_last=1
    )
    assert mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": 0.2}) is None  # no epoch schedule
    a = mgr.save({"v": 1}, epoch=1, metrics={"val_loss": 0.2})
    b = mgr.save({"v": 2}, epoch=2, metrics={"val_loss": 0.9})  # worse, saved anyway
    c = mgr.save({"v": 3}, epoch=3, metrics={"val_loss": 0.8})
    assert mgr.best == a and mgr.latest == c
    assert _names(mgr) == [a.name, c.name]  # b went: not last, not best
    assert b.name not in _names(mgr)


def test_every_seconds_with_injected_clock(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    mgr = CheckpointManager(tmp_path, every_n_epochs=None, every_seconds=10, clock=clock)
    got = []
    for t in (1005.0, 1010.0, 1015.0, 1019.9, 1021.0):
        clock.t = t
        info = mgr.epoch_end(int(t), {"t": t})
        got.append(info.time if info else None)
    assert got == [None, 1010.0, None, None, 1021.0]
    clock.t = 1025.0
    again = CheckpointManager(tmp_path, every_n_epochs=None, every_seconds=10, clock=clock)
    clock.t = 1031.0  # 10 s after the last save but only 6 s into the restarted run
    assert again.step_end(1, {"t": 0}) is None  # the timer counts from max(start, last save)
    clock.t = 1035.0
    assert again.step_end(2, {"t": 1}) is not None


def test_epoch_and_step_triggers_combined(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, every_n_epochs=2, every_n_steps=3)
    assert [mgr.step_end(s, {"s": s}) is not None for s in range(1, 7)] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert [mgr.epoch_end(e, {"e": e}, step=100 + e) is not None for e in (1, 2)] == [False, True]
    assert mgr.latest is not None and (mgr.latest.epoch, mgr.latest.step) == (2, 102)


def test_metrics_are_stored_as_plain_values(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss")
    info = mgr.epoch_end(
        1, {"v": 1}, metrics={"val_loss": np.float32(0.5), "n": np.int64(3), "tag": "x"}
    )
    assert info is not None and info.metrics == {"val_loss": 0.5, "n": 3.0, "tag": "x"}
    assert type(info.metrics["val_loss"]) is float
    assert CheckpointManager(tmp_path).latest.metrics == info.metrics  # type: ignore[union-attr]


def test_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="checkpointer")
    mgr = CheckpointManager(
        tmp_path, monitor="val_loss", save_best_only=True, keep_last=1, every_n_epochs=2
    )
    mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": 0.5})
    mgr.epoch_end(2, {"v": 2}, metrics={"val_loss": 0.5})
    mgr.epoch_end(4, {"v": 4}, metrics={"val_loss": 0.6})
    mgr.epoch_end(6, {"v": 6}, metrics={"val_loss": 0.4})
    records = [r for r in caplog.records if r.name == "checkpointer"]
    text = "\n".join(r.getMessage() for r in records)
    assert "epoch 1" in text  # not a save point, logged (debug)
    assert any(
        "saved" in r.getMessage() and "epoch-000002" in r.getMessage() and r.levelno == logging.INFO
        for r in records
    )
    assert any(
        "not saved" in r.getMessage() and "epoch 4" in r.getMessage() and r.levelno == logging.INFO
        for r in records
    )
    assert any("deleted" in r.getMessage() and "epoch-000002" in r.getMessage() for r in records)


def test_async_save_round_trip(tmp_path: Path) -> None:
    w = np.zeros(4, np.float32)
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        info = mgr.save({"w": w}, step=1)
        w += 1  # mutation after the call never changes what is saved
        mgr.wait()
        assert _names(mgr) == [info.name]
    np.testing.assert_array_equal(CheckpointManager(tmp_path).restore().state["w"], np.zeros(4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"save_best_only": True},
        {"keep_best": 2},
        {"monitor": "foo"},
        {"monitor": "val_loss", "mode": "down"},
        {"mode": "down"},
        {"nan_policy": "ignore"},
        {"every_n_epochs": 0},
        {"every_n_steps": -1},
        {"every_seconds": 0},
        {"keep_last": -1},
        {"filename": "a/{epoch}"},
        {"monitor": "val_loss", "min_delta": -1.0},
        {"max_file_bytes": 0},
    ],
)
def test_configuration_errors_at_construction(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CheckpointManager(tmp_path / "x", **kwargs)


def test_no_warning_when_metric_present(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mgr.epoch_end(1, {"v": 1}, metrics={"val_loss": 0.1})


def test_non_str_metric_names_are_refused_at_save(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    with pytest.raises((ConfigurationError, MetricError)):
        mgr.save({"w": np.ones(2)}, metrics={1: 0.5})  # type: ignore[dict-item]
