"""Preemption saves through the manager: at the next save point, whatever the schedule,
committed before the call returns, once; on every rank at the same call."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _ranks import ThreadCoordinator, run_ranks

import checkpointer
from checkpointer import CheckpointManager


@pytest.fixture(autouse=True)
def _keep_handlers() -> Any:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_signal_saves_at_the_next_step_then_never_again(tmp_path: Path, async_save: bool) -> None:
    mgr = CheckpointManager(tmp_path, every_n_steps=1000, monitor="loss", save_best_only=True,
                            async_save=async_save, save_on_preemption=True)
    assert mgr.step_end(1000, {"s": 1000}, metrics={"loss": 0.1}) is not None
    assert mgr.step_end(1001, {"s": 1001}, metrics={"loss": 0.5}) is None
    signal.raise_signal(signal.SIGTERM)  # the default action would end the test run
    assert not mgr.preempted
    info = mgr.step_end(1002, {"s": 1002}, metrics={"loss": 0.9})  # worse, not a step multiple
    assert info is not None and info.step == 1002 and mgr.preempted
    assert (tmp_path / info.name / "manifest.msgpack").exists()  # committed before returning
    assert info.nbytes > 0 and checkpointer.load(tmp_path / info.name) == {"s": 1002}
    assert mgr.step_end(1003, {"s": 1003}) == info and mgr.epoch_end(9, {"s": 0}) == info
    assert mgr.save({"s": 1}) == info  # "the loop should stop": nothing more is written
    assert [c.step for c in mgr.checkpoints] == [1000, 1002]
    mgr.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert CheckpointManager(tmp_path).latest == info


def test_request_preemption_without_handlers(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, every_n_epochs=5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert mgr.epoch_end(1, {"e": 1}) is None
    mgr.request_preemption()
    info = mgr.epoch_end(2, {"e": 2})
    assert info is not None and info.epoch == 2 and mgr.preempted


def test_a_previous_handler_still_runs(tmp_path: Path) -> None:
    seen: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    mgr = CheckpointManager(tmp_path, every_n_steps=100, save_on_preemption=True,
                            preemption_signals=["SIGUSR1"])
    signal.raise_signal(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1]
    assert mgr.step_end(3, {"s": 3}) is not None and mgr.preempted
    mgr.close()
    signal.raise_signal(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1] * 2


@pytest.mark.parametrize("bad", [{"save_on_preemption": 1}, {"save_on_preemption": True,
                                 "preemption_signals": ["SIGKILL"]}])
def test_bad_preemption_options(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(checkpointer.errors.ConfigurationError):
        CheckpointManager(tmp_path, **bad)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("async_save", [False, True])
def test_a_notice_on_one_rank_preempts_every_rank_at_the_same_step(tmp_path: Path, async_save: bool) -> None:
    def body(rank: int, coord: ThreadCoordinator) -> list[Any]:
        mgr = CheckpointManager(tmp_path, coordinator=coord, every_n_steps=100, async_save=async_save,
                                save_on_preemption=True, preemption_signals=())
        got = []
        for step in range(1, 20):
            if rank == 1 and step == 7:
                mgr.request_preemption()
            info = mgr.step_end(step, {"w": np.full(2, step)})
            got.append(None if info is None else info.step)
            if mgr.preempted:
                break
        mgr.close()
        return got

    on0, on1 = run_ranks(body, ranks=2)
    assert on0 == on1 == [None] * 6 + [7]
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints] == [7]
