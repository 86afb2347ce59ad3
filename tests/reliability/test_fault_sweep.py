"""Fault sweep: fail (or crash at) the Nth storage operation of one save, for every N.

The save under test commits a third checkpoint into a directory holding two, then applies
retention and rewrites the index. Every storage operation it performs is, in turn, made to
fail with an ``OSError`` or to "crash" (:class:`~_faultfs.Crash`, after which the store is
dead). Each case must end with a clear ``CheckpointError`` (or a success when the failing
step was only retention or the index, which the engine tolerates), the previous or the new
checkpoint as latest, everything listed verifying, nothing deleted that retention should
have kept, and no leftover once a new manager has cleaned up.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _checks import engine_leftovers
from _faultfs import Crash, FaultFS
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from checkpointer import CheckpointError, CheckpointManager
from checkpointer.storage import open_store

VARIANTS = {
    # three names; the third save makes retention delete the second one
    "new-name": {"monitor": "loss", "keep_last": 1, "keep_best": 1},
    # one name, replaced by every save
    "replace": {"filename": "slot"},
}
LOSSES = [0.5, 0.9, 0.7]


def state_at(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "a": np.full(300, step, np.float32),
        "b": np.arange(100) + step,
        "nested": [np.full(7, -step, np.int16), {"x": step}],
    }


def step_of(state: Any) -> int:
    step = state["step"]
    assert (state["a"] == step).all() and (state["b"] == np.arange(100) + step).all()
    assert (state["nested"][0] == -step).all() and state["nested"][1] == {"x": step}
    return int(step)


class Setup:
    """One directory on one backend, with two checkpoints already committed."""

    def __init__(self, backend: str, variant: str, tmp_path: Path, async_save: bool) -> None:
        self.atomic = backend == "local-rename"
        if backend == "memory-object":
            self.inner: Any = MemoryFileSystem()
            self.url = f"memory://fault-{uuid.uuid4().hex[:10]}"
        else:
            self.inner = LocalFileSystem()
            self.url = str(tmp_path / uuid.uuid4().hex[:10])
        self.kw = {**VARIANTS[variant], "max_file_bytes": 1500}
        self.async_save = async_save
        with self.manager() as mgr:
            for step in (0, 1):
                mgr.save(state_at(step), step=step, metrics={"loss": LOSSES[step]})
        self.before = {i.name for i in self.manager().checkpoints}

    def manager(self, fs: FaultFS | None = None, **kw: Any) -> CheckpointManager:
        fs = fs or FaultFS(self.inner, self.atomic)
        return CheckpointManager(self.url, filesystem=fs, **self.kw, **kw)

    def cleanup(self) -> None:
        if isinstance(self.inner, MemoryFileSystem):
            self.inner.rm(self.url, recursive=True)


def run_case(setup: Setup, n: int, crash: bool) -> str | None:
    """Fail the ``n``th operation of the third save; check the result. Returns the outcome
    (``None`` when the save performed fewer than ``n`` operations)."""
    fs = FaultFS(setup.inner, setup.atomic)
    mgr = setup.manager(fs, async_save=setup.async_save)
    fs.fail_at, fs.crash, start = len(fs.ops) + n, crash, len(fs.ops)
    outcome = "ok"
    try:
        mgr.save(state_at(2), step=2, metrics={"loss": LOSSES[2]})
        mgr.wait()
    except Crash:
        outcome = "crash"
    except CheckpointError as exc:
        outcome = "error"
        assert mgr.latest is not None and mgr.latest.step == 1, "a failed save became latest"
        assert str(exc), "an error without a message"
    where = f"op {n} ({fs.ops[start + n - 1] if len(fs.ops) >= start + n else '-'})"
    if outcome == "ok" and len(fs.ops) < fs.fail_at:
        mgr.close()
        return None
    if not fs.crashed:
        mgr.close()
    if check_after(setup, outcome, where):
        return outcome + "+index-tmp-leftover"
    return outcome


def check_after(setup: Setup, outcome: str, where: str) -> bool:
    """Check the directory after one case; True when only the known index leftover remains."""
    with setup.manager() as mgr:  # a new manager: its cleanup runs first
        infos = mgr.checkpoints
        names = {i.name for i in infos}
        latest = mgr.restore("latest", fallback=False)
        got = step_of(latest.state)
        assert got == latest.info.step, where
        for info in infos:
            assert step_of(mgr.restore(info.name).state) == info.step, where
        if outcome == "error":
            assert got == 1 and names == setup.before, f"{where}: a failed save left {names}"
        elif outcome == "ok":
            assert got == 2, f"{where}: a successful save is not latest"
        assert got in (1, 2), where
        if "monitor" in setup.kw:  # retention keeps the best (step 0) and the newest
            assert {"step-000000000", latest.info.name} <= names, f"{where}: {names}"
            assert names <= setup.before | {latest.info.name}, where
        left = engine_leftovers(
            open_store(setup.url, filesystem=FaultFS(setup.inner, setup.atomic)), sorted(names)
        )
        assert not [x for x in left if not x.startswith(INDEX_TMP)], f"{where}: leftovers {left}"
        return bool(left)


# Known bug in checkpointer/index.py (write_index): the owner of the index's temporary file
# is registered with new_owner() and never released, and the file is not removed when the
# rename fails, so it outlives the failed save for as long as the process runs (a killed
# process's file is cleaned up). The sweep tolerates only that leftover, and counts it;
# test_index_tmp_removed_after_failed_rename pins the bug.
INDEX_TMP = ".ckpt-tmp-index-"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["local-rename", "memory-object"])
def test_fault_sweep(
    backend: str, variant: str, async_save: bool, tmp_path: Path, trials: Counter[str]
) -> None:
    outcomes: Counter[str] = Counter()
    for crash in (False, True):
        n = 1
        while True:
            setup = Setup(backend, variant, tmp_path, async_save)
            outcome = run_case(setup, n, crash)
            setup.cleanup()
            if outcome is None:
                break
            outcomes[outcome.split("+")[0]] += 1
            trials["fault-sweep cases leaving the known index tmp file"] += "+" in outcome
            n += 1
        assert n > 5, "the save performed suspiciously few storage operations"
    assert outcomes["error"] and outcomes["crash"]
    trials["fault-sweep cases (failed op)"] += outcomes["error"] + outcomes["ok"]
    trials["fault-sweep cases (crash)"] += outcomes["crash"]


def test_index_tmp_removed_after_failed_rename(tmp_path: Path) -> None:
    setup = Setup("local-rename", "new-name", tmp_path, False)
    fs = FaultFS(setup.inner, True)
    mgr = setup.manager(fs)
    ops = len(fs.ops)
    mgr.save(state_at(2), step=2, metrics={"loss": LOSSES[2]})
    index_rename = next(
        i for i, op in enumerate(fs.ops[ops:], ops + 1) if op.startswith("rename") and op.endswith(".ckpt-index.msgpack")
    )
    setup = Setup("local-rename", "new-name", tmp_path, False)
    fs = FaultFS(setup.inner, True, fail_at=index_rename)
    setup.manager(fs).save(state_at(2), step=2, metrics={"loss": LOSSES[2]})
    assert not check_after(setup, "ok", "index rename")
