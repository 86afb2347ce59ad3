"""The every_seconds timer runs on this process's own clock: a checkpoint dated in the
future (clock skew between writers) never stops it, and it says so."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from checkpointer import CheckpointManager, CheckpointWarning


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_checkpoint_dated_in_the_future_does_not_stop_the_timer(tmp_path: Path) -> None:
    ahead = CheckpointManager(tmp_path, clock=Clock(1e9 + 60_000.0))  # another writer, 16.7 h ahead
    ahead.save({"w": np.zeros(1)}, step=0)
    clock = Clock(1e9)
    with pytest.warns(CheckpointWarning, match=r"dated in the future .* by 60000 s"):
        mgr = CheckpointManager(tmp_path, every_n_epochs=None, every_seconds=10, clock=clock)
    saved = []
    for step in range(1, 61):  # one step a second for a minute
        clock.t += 1.0
        if mgr.step_end(step, {"w": np.full(1, step)}) is not None:
            saved.append(step)
    assert saved == [10, 20, 30, 40, 50, 60]


def test_the_timer_runs_on_the_monotonic_clock_by_default(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, every_n_epochs=None, every_seconds=1.0)
    assert mgr.step_end(1, {"w": np.zeros(1)}) is None
    time.sleep(1.05)
    info = mgr.step_end(2, {"w": np.zeros(1)})
    assert info is not None and abs(info.time - time.time()) < 5  # manifests keep wall time
    assert mgr.step_end(3, {"w": np.zeros(1)}) is None  # a tiny save takes far less than 1 s


def test_no_warning_without_a_timer_or_skew(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    CheckpointManager(tmp_path).save({"w": np.zeros(1)}, step=0)
    CheckpointManager(tmp_path, every_seconds=10)
    CheckpointManager(tmp_path, clock=Clock(0.0))  # skewed, but no timer to protect
    assert not [w for w in recwarn if issubclass(w.category, CheckpointWarning)]
