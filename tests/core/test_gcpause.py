"""The cyclic GC pause around saves and loads: main thread only, always restored."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import checkpointer
from checkpointer.gcpause import gc_paused


def test_paused_in_the_block_and_restored_after() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_left_off_when_the_caller_turned_it_off() -> None:
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_background_threads_never_pause_it() -> None:
    seen = []

    def work() -> None:
        with gc_paused():
            seen.append(gc.isenabled())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [True]


def test_save_and_load_leave_it_on(tmp_path) -> None:
    checkpointer.save(tmp_path / "c", {"w": np.ones(3)})
    assert gc.isenabled()
    with pytest.raises(checkpointer.CheckpointError):
        checkpointer.load(tmp_path / "missing")
    assert gc.isenabled()
    assert np.array_equal(checkpointer.load(tmp_path / "c")["w"], np.ones(3))
    assert gc.isenabled()
