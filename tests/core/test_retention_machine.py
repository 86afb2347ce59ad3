"""Retention under random runs: saves, failed saves, crashes, reopenings, restores, foreign files.

A hypothesis state machine drives a real :class:`CheckpointManager` (local disk and
``memory://``) next to a small model of what must be kept, and checks after every step:
kept == last N ∪ best K ∪ step milestones ∪ {newest, best} ∪ restored-from ∪ not-ours; foreign files and
folders survive; every listed checkpoint loads and holds what was saved; deletions happen
only once the new checkpoint has committed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from typing import Any
from unittest import mock

import fsspec
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import checkpointer
from checkpointer import CheckpointManager, CheckpointWarning
from checkpointer.commit import TMP_PREFIX
from checkpointer.errors import StorageError
from checkpointer.owners import HOST as _HOST

SCORES = st.sampled_from([None, float("nan"), float("inf"), 0.1, 0.2, 0.3, 0.5, 0.7])
_dead_pid: int | None = None


def dead_pid() -> int:
    """The pid of a process that has exited."""
    global _dead_pid
    if _dead_pid is None:
        p = subprocess.Popen(["true"])
        p.wait()
        _dead_pid = p.pid
    return _dead_pid


@dataclass
class Rec:
    name: str
    seq: int
    score: float | None
    managed: bool
    value: int
    order: int = 0  # creation order: breaks ties of seq (foreign checkpoints all have -1)


class RetentionMachine(RuleBasedStateMachine):
    backend = "local"

    def __init__(self) -> None:
        super().__init__()
        if self.backend == "local":
            self.tmp = tempfile.mkdtemp(prefix="ret-machine-")
            self.url = self.tmp
        else:
            self.url = f"memory://ret-{uuid.uuid4().hex}"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.records: dict[str, Rec] = {}
        self.protected: set[str] = set()
        self.foreign: list[str] = []
        self.step = 0
        self.pending: str | None = None
        self.ticks = 0

    def _tick(self) -> int:
        self.ticks += 1
        return self.ticks

    def teardown(self) -> None:
        if self.backend == "local":
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    # -- the manager and its guard ---------------------------------------------------------

    def _open(self) -> None:
        self.mgr = CheckpointManager(
            self.url,
            monitor="val_metric",
            mode=self.mode,
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            keep_every_n_steps=self.keep_every,
        )
        store = self.mgr._store
        remove_tree = store.remove_tree

        def guarded(rel: str) -> None:  # deletion only after the new save committed
            assert self.pending is not None, f"deleting {rel} outside a save"
            assert rel != self.pending
            assert store.exists(f"{self.pending}/manifest.msgpack"), "deleted before commit"
            remove_tree(rel)

        store.remove_tree = guarded  # type: ignore[method-assign]

    @initialize(
        keep_last=st.sampled_from([None, 0, 1, 2, 3]),
        keep_best=st.sampled_from([None, 0, 1, 2]),
        mode=st.sampled_from(["min", "max"]),
        keep_every=st.sampled_from([None, None, 2, 3]),
    )
    def start(self, keep_last: int | None, keep_best: int | None, mode: str, keep_every: int | None) -> None:
        self.keep_last, self.keep_best, self.mode = keep_last, keep_best, mode
        self.keep_every = keep_every
        self._open()

    # -- model ---------------------------------------------------------------------------

    def _key(self, r: Rec) -> tuple[float, int]:
        assert r.score is not None
        return (r.score if self.mode == "min" else -r.score, r.seq)

    def _ranked(self, recs: list[Rec]) -> list[Rec]:
        return sorted(
            (r for r in recs if r.score is not None and math.isfinite(r.score)), key=self._key
        )

    def _best(self) -> Rec | None:
        ranked = self._ranked(list(self.records.values()))
        return ranked[0] if ranked else None

    def _newest(self) -> Rec | None:
        return max(self.records.values(), key=lambda r: (r.seq, r.order), default=None)

    def _apply_retention(self) -> None:
        if self.keep_last is None and self.keep_best is None:
            return
        recs = sorted(self.records.values(), key=lambda r: r.seq)
        managed = [r for r in recs if r.managed]
        keep = {r.name for r in recs if not r.managed} | self.protected
        for r in (self._newest(), self._best()):
            if r is not None:
                keep.add(r.name)
        if self.keep_last:
            keep |= {r.name for r in managed[-self.keep_last :]}
        if self.keep_best:
            keep |= {r.name for r in self._ranked(managed)[: self.keep_best]}
        if self.keep_every:  # milestones: a step multiple of keep_every_n_steps
            keep |= {r.name for r in managed if int(r.name.split("-")[1]) % self.keep_every == 0}
        self.records = {n: r for n, r in self.records.items() if n in keep}

    # -- rules ---------------------------------------------------------------------------

    def _save(self, step: int, score: float | None, via_epoch_end: bool) -> None:
        name = f"step-{step:09d}"
        seq = max([r.seq for r in self.records.values()] + [-1]) + 1
        metrics = {} if score is None else {"val_metric": score}
        state = {"w": np.full(3, seq, dtype=np.int64), "seq": seq}
        self.pending = name
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if via_epoch_end:
                    info = self.mgr.epoch_end(seq, lambda: state, step=step, metrics=metrics)
                else:
                    info = self.mgr.save(state, step=step, metrics=metrics)
        finally:
            self.pending = None
        assert info is not None and info.name == name
        if score is None:
            assert any(issubclass(w.category, CheckpointWarning) for w in caught)
        self.records.pop(name, None)
        self.records[name] = Rec(name, seq, score, True, seq, self._tick())
        self._apply_retention()

    @rule(score=SCORES, via_epoch_end=st.booleans())
    def save(self, score: float | None, via_epoch_end: bool) -> None:
        self.step += 1
        self._save(self.step, score, via_epoch_end)

    @precondition(lambda self: any(r.managed for r in self.records.values()))
    @rule(score=SCORES, data=st.data())
    def save_over_existing_name(self, score: float | None, data: Any) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, r in self.records.items() if r.managed)))
        self._save(int(name.split("-")[1]), score, False)

    @rule(score=SCORES)
    def failed_save(self, score: float | None) -> None:
        self.step += 1
        real = checkpointer.format.write_safetensors
        calls = []

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            raise OSError(28, "No space left on device (injected)")

        metrics = {} if score is None else {"val_metric": score}
        with (
            mock.patch("checkpointer.format.write_safetensors", failing),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            with pytest.raises(StorageError):
                self.mgr.save({"w": np.zeros(2)}, step=self.step, metrics=metrics)
        assert calls and checkpointer.format.write_safetensors is real
        assert not self.fs.exists(f"{self.root}/step-{self.step:09d}/manifest.msgpack")

    @rule()
    def reopen(self) -> None:
        self._open()
        self.protected = set()

    @rule(crashed_save=st.booleans())
    def crash_leaves_leftover_then_reopen(self, crashed_save: bool) -> None:
        owner = f"{_HOST}.{dead_pid()}.{uuid.uuid4().hex[:8]}"
        leftover = f"{self.root}/{TMP_PREFIX}step-{self.step + 1:09d}-{owner}"
        self.fs.makedirs(leftover, exist_ok=True)
        self.fs.pipe_file(f"{leftover}/data-00000.safetensors", b"\0" * 16)
        if crashed_save:
            self.fs.pipe_file(f"{leftover}/manifest.msgpack", b"junk")
        self._open()
        self.protected = set()
        assert not self.fs.exists(leftover), "a dead writer's leftover survived startup"

    @precondition(lambda self: bool(self.records))
    @rule(which=st.sampled_from(["latest", "best"]))
    def restore(self, which: str) -> None:
        want = self._newest() if which == "latest" else self._best()
        if want is None:
            return
        ckpt = self.mgr.restore(which)
        assert ckpt.info.name == want.name
        if want.managed:
            assert ckpt.state["seq"] == want.value
        self.protected.add(want.name)

    @rule(kind=st.sampled_from(["folder", "file", "checkpoint"]))
    def add_foreign(self, kind: str) -> None:
        name = f"foreign-{kind}-{len(self.foreign)}"
        if kind == "folder":
            self.fs.makedirs(f"{self.root}/{name}", exist_ok=True)
            self.fs.pipe_file(f"{self.root}/{name}/notes.txt", b"not a checkpoint")
            self.foreign.append(f"{name}/notes.txt")
        elif kind == "file":
            self.fs.pipe_file(f"{self.root}/{name}.txt", b"hello")
            self.foreign.append(f"{name}.txt")
        else:  # a checkpoint written outside the manager: listed, never deleted
            checkpointer.save(f"{self.url}/{name}", {"x": np.ones(1)})
            self.foreign.append(f"{name}/manifest.msgpack")
            self._open()
            self.protected = set()
            self.records[name] = Rec(name, -1, None, False, -1, self._tick())

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        if not hasattr(self, "mgr"):
            return
        listed = [c.name for c in self.mgr.checkpoints]
        assert sorted(listed) == sorted(self.records), (listed, sorted(self.records))
        newest, best = self._newest(), self._best()
        assert (self.mgr.latest.name if self.mgr.latest else None) == (
            newest.name if newest else None
        )
        assert (self.mgr.best.name if self.mgr.best else None) == (best.name if best else None)
        for f in self.foreign:
            assert self.fs.exists(f"{self.root}/{f}"), f"foreign {f} was deleted"
        for info in self.mgr.checkpoints:
            state = checkpointer.load(info.url)
            rec = self.records[info.name]
            if rec.managed:
                assert state["seq"] == rec.value
                assert state["w"].tolist() == [rec.value] * 3


MACHINE_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class LocalRetentionMachine(RetentionMachine):
    backend = "local"


class MemoryRetentionMachine(RetentionMachine):
    backend = "memory"


TestRetentionLocal = LocalRetentionMachine.TestCase
TestRetentionLocal.settings = MACHINE_SETTINGS
TestRetentionMemory = MemoryRetentionMachine.TestCase
TestRetentionMemory.settings = MACHINE_SETTINGS
