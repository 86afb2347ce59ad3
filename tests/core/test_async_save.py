"""Asynchronous saving: snapshot semantics, error surfacing, exit behaviour, best decisions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from checkpointer import CheckpointManager, StorageError
from checkpointer import commit as commit_mod
from checkpointer import format as fmt
from checkpointer.async_save import AsyncWriter
from checkpointer.tree import flatten


def _state(seed: int, n: int = 1 << 18) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((n // 256, 256), dtype=np.float32)
    return {
        "w": big,
        "view": big[:, ::3],  # non-contiguous
        "be": rng.integers(0, 1 << 30, 1000).astype(">i4"),  # big-endian
        "bf": rng.standard_normal(4097).astype(ml_dtypes.bfloat16),
        "i8": rng.integers(-128, 127, (33, 7), dtype=np.int8),
        "step": seed,
        "nested": [np.arange(5.0), (np.zeros((0, 3)), "x")],
    }


def _same(a: Any, b: Any) -> None:
    _, xa = flatten(a)
    _, xb = flatten(b)
    assert [k for k, _ in xa] == [k for k, _ in xb]
    for (k, x), (_, y) in zip(xa, xb, strict=True):
        assert x.shape == y.shape, k
        assert x.dtype.newbyteorder("=") == y.dtype.newbyteorder("="), k
        assert (
            x.astype(x.dtype.newbyteorder("<")).tobytes()
            == y.astype(y.dtype.newbyteorder("<")).tobytes()
        ), k


@pytest.fixture
def slow_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every background write until the returned event is set."""
    gate = threading.Event()
    real = fmt.write_safetensors

    def held(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "write_safetensors", held)
    return gate


def test_mutation_after_return_never_changes_what_is_saved(tmp_path: Any) -> None:
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        state = _state(0)
        expected = []
        for i in range(25):
            snapshot = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
            snapshot["nested"] = [state["nested"][0].copy(), (state["nested"][1][0].copy(), "x")]
            mgr.save(state, step=i)
            expected.append(snapshot)
            # scribble on every array while the background thread writes
            state["w"] += 1.0  # also changes state["view"], a view of it
            state["be"][:] = i
            state["bf"][::2] = -1
            state["i8"] ^= 0x55
            state["nested"][0][:] = -i
        mgr.wait()
        for i, snapshot in enumerate(expected):
            _same(mgr.restore(i).state, snapshot)


def test_callable_state_is_resolved_in_the_caller(tmp_path: Any) -> None:
    threads = []

    def make() -> dict[str, Any]:
        threads.append(threading.current_thread())
        return {"a": np.ones(3)}

    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(make, step=1)
    assert threads == [threading.current_thread()]
    assert mgr.latest is not None and mgr.latest.step == 1


def test_arena_is_reused_and_grows_with_the_state(tmp_path: Any) -> None:
    with CheckpointManager(tmp_path, async_save=True, keep_last=1) as mgr:
        writer = mgr._async
        assert writer is not None
        mgr.save({"a": np.ones(1000, np.float32)}, step=1)
        cap, arena = writer.capacity, writer._arena
        mgr.save({"a": np.zeros(1000, np.float32)}, step=2)
        assert writer.capacity == cap and writer._arena is arena
        mgr.save({"a": np.zeros(5000, np.float32), "b": np.ones(7)}, step=3)
        assert writer.capacity >= 5000 * 4 + 7 * 8
        staged = writer.stage([("x", np.arange(10, dtype=">f8")[::2])])
        assert staged[0][1].flags.c_contiguous and staged[0][1].dtype == np.dtype("<f8")
        assert staged[0][1].ctypes.data % 64 == 0
        np.testing.assert_array_equal(staged[0][1], np.arange(10.0)[::2])


def test_background_failure_surfaces_at_next_call_and_is_never_listed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = commit_mod.write_checkpoint

    def flaky(*args: Any, **kwargs: Any) -> commit_mod.Committed:
        if args[4]["step"] == 2:
            time.sleep(0.05)
            raise StorageError("injected: disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(commit_mod, "write_checkpoint", flaky)
    mgr = CheckpointManager(tmp_path, async_save=True, monitor="loss")
    mgr.save({"a": np.ones(3)}, step=1, metrics={"loss": 1.0})
    mgr.wait()
    mgr.save({"a": np.ones(3)}, step=2, metrics={"loss": 0.1})  # returns: failure comes later
    with pytest.raises(StorageError, match="injected"):
        mgr.epoch_end(3, {"a": np.ones(3)}, metrics={"loss": 0.5})
    assert [c.step for c in mgr.checkpoints] == [1]
    assert mgr.latest is not None and mgr.latest.step == 1
    assert mgr.best is not None and mgr.best.step == 1
    mgr.wait()  # raised once, not twice
    assert mgr.save({"a": np.ones(3)}, step=4, metrics={"loss": 0.7}).step == 4
    mgr.close()
    assert [c.step for c in mgr.checkpoints] == [1, 4]
    reopened = CheckpointManager(tmp_path, monitor="loss")
    assert [c.step for c in reopened.checkpoints] == [1, 4]
    assert reopened.best is not None and reopened.best.step == 4


@pytest.mark.parametrize("surface", ["wait", "close", "save", "step_end"])
def test_failing_filesystem_error_raised_by_each_entry_point(surface: str) -> None:
    class FailingFS(MemoryFileSystem):
        broken = False

        def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
            if self.broken and "w" in mode:
                raise OSError(28, "No space left on device")
            return super()._open(path, mode, **kwargs)

    fs = FailingFS()
    root = f"memory://async-{uuid.uuid4().hex}"
    mgr = CheckpointManager(root, async_save=True, filesystem=fs, every_n_steps=1)
    mgr.save({"a": np.arange(4)}, step=1)
    mgr.wait()
    fs.broken = True
    mgr.save({"a": np.arange(4)}, step=2)
    while (
        mgr._async is not None and mgr._async._future is not None and not mgr._async._future.done()
    ):
        time.sleep(0.01)
    fs.broken = False
    call = {
        "wait": mgr.wait,
        "close": mgr.close,
        "save": lambda: mgr.save({"a": np.arange(4)}, step=3),
        "step_end": lambda: mgr.step_end(3, {"a": np.arange(4)}),
    }[surface]
    with pytest.raises(StorageError, match="No space left"):
        call()
    mgr.close()
    assert [c.step for c in mgr.checkpoints] == [1]
    assert [c.step for c in CheckpointManager(root, filesystem=fs).checkpoints] == [1]


def test_pending_save_counts_for_save_best_only(
    tmp_path: Any, slow_writes: threading.Event
) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True, monitor="val_loss", save_best_only=True)
    assert mgr.epoch_end(1, {"a": np.ones(2)}, metrics={"val_loss": 1.0}) is not None
    assert mgr.checkpoints == []  # still in flight
    # worse than the pending save: skipped although nothing is committed yet
    assert mgr.epoch_end(2, {"a": np.ones(2)}, metrics={"val_loss": 2.0}) is None
    slow_writes.set()
    assert mgr.epoch_end(3, {"a": np.ones(2)}, metrics={"val_loss": 0.5}) is not None
    mgr.close()
    assert [c.epoch for c in mgr.checkpoints] == [1, 3]
    assert mgr.best is not None and mgr.best.epoch == 3


def test_next_save_waits_for_the_one_in_flight(tmp_path: Any, slow_writes: threading.Event) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save({"a": np.ones(2)}, step=1)
    threading.Timer(0.2, slow_writes.set).start()
    t0 = time.perf_counter()
    mgr.save({"a": np.ones(2)}, step=2)  # blocks until step 1 committed
    assert time.perf_counter() - t0 >= 0.15
    assert [c.step for c in mgr.checkpoints][:1] == [1]
    mgr.close()
    assert [c.step for c in mgr.checkpoints] == [1, 2]
    assert len({c.name for c in mgr.checkpoints}) == 2


_EXIT_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from checkpointer import CheckpointManager
    from checkpointer import format as fmt

    real = fmt.write_safetensors
    def slow(*a, **k):
        time.sleep(0.5)  # make sure the save is still running when the main thread ends
        return real(*a, **k)
    fmt.write_safetensors = slow

    mgr = CheckpointManager(sys.argv[1], async_save=True)
    state = {"w": np.random.default_rng(7).standard_normal(8 << 20, dtype=np.float32)}
    mgr.save(state, step=42)
    state["w"][:] = 0
    print("busy" if mgr._async.busy and mgr.latest is None else "done", flush=True)
    # no close(), no wait(): the interpreter must finish the save before exiting
""")


def test_save_running_at_exit_is_completed(tmp_path: Any) -> None:
    script = tmp_path / "exit_save.py"
    script.write_text(_EXIT_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "busy"
    mgr = CheckpointManager(tmp_path / "ck")
    assert [c.step for c in mgr.checkpoints] == [42]
    restored = mgr.restore("latest", verify=True).state
    expected = np.random.default_rng(7).standard_normal(8 << 20, dtype=np.float32)
    assert restored["w"].tobytes() == expected.tobytes()


def test_manager_usable_after_close(tmp_path: Any) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save({"a": np.ones(2)}, step=1)
    mgr.close()
    mgr.save({"a": np.ones(2)}, step=2)
    mgr.close()
    assert [c.step for c in mgr.checkpoints] == [1, 2]


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread niceness is Linux-only"
)
def test_writer_thread_is_niced(tmp_path: Any) -> None:
    from checkpointer import async_save

    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save({"a": np.ones(2)}, step=1)
        mgr.wait()
        workers = [t for t in threading.enumerate() if t.name.startswith("checkpointer-save")]
        assert workers and workers[0].native_id is not None
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = os.getpriority(os.PRIO_PROCESS, workers[0].native_id)
        assert theirs == min(19, mine + async_save.NICE)


_ATEXIT_SAVE = textwrap.dedent("""
    import atexit, sys
    import numpy as np
    from checkpointer import CheckpointManager

    mgr = CheckpointManager(sys.argv[1], async_save=True)
    mgr.save({"w": np.zeros(3)}, step=1)
    atexit.register(lambda: mgr.save({"w": np.ones(3)}, step=2))  # after executors shut down
""")


def test_async_save_from_an_atexit_handler_still_saves(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _ATEXIT_SAVE, str(tmp_path / "ck")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    mgr = CheckpointManager(tmp_path / "ck")
    assert [c.step for c in mgr.checkpoints] == [1, 2]
    assert mgr.restore("latest").state["w"].tolist() == [1.0, 1.0, 1.0]


def test_the_writer_hands_back_what_it_was_given_while_the_job_runs() -> None:
    gate = threading.Event()
    writer: AsyncWriter[tuple[str, int]] = AsyncWriter()
    writer.submit(lambda: gate.wait(10), pending=("epoch-3", 3), label="epoch-3")
    assert writer.busy and writer.pending == ("epoch-3", 3)
    gate.set()
    writer.wait()
    assert not writer.busy and writer.pending is None

    def fails() -> None:
        raise StorageError("bucket full")
    writer.submit(fails, pending=("epoch-4", 4), label="epoch-4")
    with pytest.raises(StorageError, match="bucket full"):
        writer.wait()
    assert writer.pending is None  # a failed job is not pending either
    writer.close()

