"""Asynchronous saves with several ranks, each rank a thread with its own manager
(the thread coordinator of ``_ranks.py``)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from _ranks import RANKS, NoBackground, Store, ThreadCoordinator, run_ranks

import checkpointer
from checkpointer import CheckpointError, CheckpointManager, collective
from checkpointer.sharding import Shard, ShardedArray


def state(rank: int, value: float) -> dict[str, Any]:
    """A replicated array and this rank's row block of a sharded (RANKS*2, 3) array."""
    piece = np.full((2, 3), value + rank, np.float32)
    return {"w": np.full(5, value, np.float64), "step": int(value),
            "x": ShardedArray((RANKS * 2, 3), np.dtype(np.float32), (Shard((2 * rank, 0), piece),))}


def expected_x(value: float) -> np.ndarray:
    return np.repeat(np.arange(RANKS, dtype=np.float32) + value, 2)[:, None] * np.ones(3, np.float32)


def test_async_saves_of_several_ranks_run_in_the_background_and_keep_the_values(tmp_path, monkeypatch):
    release = threading.Event()
    writers: list[str] = []
    real = collective.write_rank_files

    def slow_rank_files(*args: Any, **kwargs: Any) -> Any:
        writers.append(threading.current_thread().name)
        assert release.wait(60), "the save of a rank blocked its training thread"
        return real(*args, **kwargs)
    monkeypatch.setattr(collective, "write_rank_files", slow_rank_files)

    returned = threading.Barrier(RANKS + 1, timeout=60)
    threading.Thread(target=lambda: (returned.wait(), release.set()), daemon=True).start()

    def body(rank: int, coord: ThreadCoordinator) -> list[str]:
        mgr = CheckpointManager(tmp_path, async_save=True, keep_last=3, coordinator=coord)
        for step in range(1, 6):
            s = state(rank, float(step))
            info = mgr.save(s, step=step)
            assert info.name == f"step-{step:09d}" and info.nbytes == 0
            if step == 1:
                returned.wait()  # every rank is back while its first save waits: asynchronous
            s["w"][:] = -1  # mutating after the call never changes what is saved
            s["x"].shards[0].data[:] = -1
        mgr.wait()
        names = [c.name for c in mgr.checkpoints]
        assert mgr.restore("latest").state["step"] == 5
        mgr.close()
        assert mgr.save(state(rank, 6.0), step=6).nbytes == 0  # after close: a new background group
        mgr.close()
        return names

    stores: list[Store] = []
    names = run_ranks(body, stores=stores)
    assert names[0] == names[1] == names[2] == [f"step-{s:09d}" for s in (3, 4, 5)]
    assert stores[0].data == {}  # every key deleted once all ranks had read it
    assert writers and all(n.startswith("checkpointer-save") for n in writers)
    for step in (4, 5, 6):  # keep_last=3: step 6 (saved after close) replaced step 3
        loaded = checkpointer.load(tmp_path / f"step-{step:09d}")
        assert np.array_equal(loaded["w"], np.full(5, step, np.float64))
        assert np.array_equal(loaded["x"], expected_x(step)) and loaded["step"] == step


def test_a_background_failure_on_one_rank_is_raised_on_every_rank_and_saving_goes_on(tmp_path, monkeypatch):
    real = collective.write_rank_files

    def failing(store: Any, folder: str, prefix: str, *args: Any, **kwargs: Any) -> Any:
        if prefix.endswith("r00001-") and "step-000000003" in store.url_of(folder) + prefix:
            raise OSError(28, "No space left on device")
        return real(store, folder, prefix, *args, **kwargs)
    monkeypatch.setattr(collective, "write_rank_files", failing)

    def body(rank: int, coord: ThreadCoordinator) -> tuple[str, str | None, list[str]]:
        mgr = CheckpointManager(tmp_path, async_save=True, coordinator=coord)
        mgr.save(state(rank, 1.0), step=1)
        mgr.save(state(rank, 2.0), step=2)
        mgr.save(state(rank, 3.0), step=3)  # rank 1's part fails in the background
        with pytest.raises(CheckpointError) as raised:
            mgr.save(state(rank, 4.0), step=4)  # the error surfaces at the next call
        mgr.save(state(rank, 5.0), step=5)
        mgr.close()
        return str(raised.value), mgr.latest.name if mgr.latest else None, [c.name for c in mgr.checkpoints]

    results = run_ranks(body)
    for message, latest, names in results:
        assert "rank 1" in message and "No space left" in message, message
        assert latest == "step-000000005"
        assert names == ["step-000000001", "step-000000002", "step-000000005"]
    assert not (tmp_path / "step-000000003").exists()
    assert np.array_equal(checkpointer.load(tmp_path / "step-000000005")["x"], expected_x(5.0))


@pytest.mark.parametrize("async_save", [False, True])
def test_a_rank_that_cannot_build_its_state_fails_the_save_on_every_rank(tmp_path, async_save):
    def body(rank: int, coord: ThreadCoordinator) -> str:
        mgr = CheckpointManager(tmp_path, async_save=async_save, coordinator=coord)
        mgr.save(state(rank, 1.0), step=1)

        def broken() -> Any:
            if rank == 2:
                raise ValueError("rank 2 has no state")
            return state(rank, 2.0)
        try:
            mgr.save(broken, step=2)
            mgr.wait()
        except (CheckpointError, ValueError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        else:
            message = "no error"
        mgr.close()
        assert [c.name for c in mgr.checkpoints] == ["step-000000001"]
        return message

    messages = run_ranks(body)
    assert all("rank 2 has no state" in m for m in messages), messages
    assert messages[2].startswith("ValueError")  # its own error on the rank that failed


def test_without_a_background_coordinator_several_ranks_save_synchronously(tmp_path):
    def body(rank: int, coord: ThreadCoordinator) -> int:
        mgr = CheckpointManager(tmp_path, async_save=True, coordinator=coord)
        info = mgr.save(state(rank, 1.0), step=1)
        mgr.close()
        return info.nbytes

    assert all(n > 0 for n in run_ranks(body, NoBackground))  # committed before returning
