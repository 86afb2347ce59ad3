"""Lightning ``ModelCheckpoint(save_on_preemption=True)``: a real SIGTERM sent to a real ``fit``.

The child (``lightning_preempt_child.py``) ranks by ``val_loss`` per epoch, with neither
``save_last`` nor a step schedule: no save would come mid-epoch. SIGTERM comes at batch 2 of
epoch 2. The callback must save the full state as ``last.ckpt`` at that batch's end (0 steps
lost), stop training, and ``fit`` must return normally (not Lightning's
``SIGTERMException``), the child exiting 0 with its signal handler back in place. A new
process resumes with ``trainer.fit(ckpt_path="last")`` mid-epoch and must end with exactly
(bit for bit) the weights and optimizer state of a run that was never interrupted.
A synchronous run, then an ``async_save=True`` one, in the same child (a Lightning import
costs 7 s of CPU); then one whose signal comes during validation, where Lightning would
raise ``SIGTERMException`` at the next validation batch: the save waits for the end of
validation (a regular Lightning save point) and is resumed exactly too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import checkpointer

pytestmark = pytest.mark.skipif(  # not imported here: the children do (7 s of CPU each)
    importlib.util.find_spec("lightning") is None, reason="lightning is not installed")

HERE = Path(__file__).parent
CHILD = HERE / "lightning_preempt_child.py"
BATCHES = 8  # per epoch in the child
MODES = ("sync", "async")


def _start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _until_ready(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """The JSON lines printed before the next ``ready``."""
    assert proc.stdout is not None
    before = []
    while (line := proc.stdout.readline()).strip() != "ready":
        assert line, proc.stderr.read() if proc.stderr else ""  # the child ended early
        if line.startswith("{"):
            before.append(json.loads(line))
    return before


def _results(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_a_signal_saves_last_at_the_next_batch_stops_fit_and_ckpt_path_last_resumes_exactly(
    tmp_path: Path,
) -> None:
    proc = _start("preempt", tmp_path)
    printed = []
    for _ in MODES:  # the sync run, then the async one
        printed += _until_ready(proc)
        os.kill(proc.pid, signal.SIGTERM)
    stopped = {r["run"]: r for r in printed + _results(proc)}
    assert list(stopped) == [*MODES, "val"]
    val = stopped.pop("val")  # the end of epoch 2's validation, its scheduled save too
    assert val["preempted"] and val["step"] == 2 * BATCHES and val["handler_restored"], val
    assert [n for n in val["listing"] if not n.startswith(".")] == [
        f"epoch=0-step={BATCHES}.ckpt", f"epoch=1-step={2 * BATCHES}.ckpt", "last.ckpt"], val
    for how, got in stopped.items():
        step = got["step"]
        # the signal came at batch at_signal's end, before the checkpoint callback's hook
        # (Lightning runs it last): it saved at that very batch end, 0 steps lost
        assert step == got["at_signal"], (how, got)
        assert step == BATCHES + 2, (how, got)  # batch 2 of epoch 2: mid-epoch
        assert got["preempted"] and got["last"] == "last.ckpt", (how, got)
        assert got["handler_restored"], (how, got)
        # epoch 1's ranked checkpoint, then the preemption's last: nothing else
        assert [n for n in got["listing"] if not n.startswith(".")] == [
            f"epoch=0-step={BATCHES}.ckpt", "last.ckpt"], (how, got)  # fmt: skip
        last = checkpointer.load(tmp_path / how / "ck" / "last.ckpt")
        assert last["global_step"] == step and last["epoch"] == 1, (how, sorted(last))
        assert "optimizer_states" in last and "loops" in last  # the full training state

    resumed = _results(_start("resume", tmp_path))  # both runs, and one never interrupted
    assert [r["run"] for r in resumed] == [*MODES, "val"]
    stopped["val"] = val
    for again in resumed:
        how = again["run"]
        assert again["first_step"] == stopped[how]["step"], again  # the batch after the stop
        assert again["steps"] == 3 * BATCHES, again
        assert again["resumed_vs_straight"] == 0.0, again  # weights and Adam state, bit for bit
        assert not again["not_resumable_warning"] and not again["preempted"], again


def test_under_ddp_a_signal_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 only (Lightning 2.6's own SIGTERM handler runs a collective inside
    the handler, so a SIGTERM on one rank only desynchronises the ranks with or without this
    callback): every rank stops at the same step, rank 0 wrote one last checkpoint."""
    proc = _start("ddp", tmp_path)
    _until_ready(proc)  # printed by rank 0, the process started here
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(ranks) == 1, ranks  # rank 1, started by Lightning's launcher
    os.kill(int(ranks[0]), signal.SIGUSR1)
    _results(proc)
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)]
    steps = {r["step"] for r in reports}
    assert len(steps) == 1 and all(r["preempted"] and r["last"] == "last.ckpt" for r in reports)
    (step,) = steps
    assert step == BATCHES + 2, reports  # batch 2 of epoch 2 (each rank runs all 8 batches)
    assert sorted(n for n in os.listdir(tmp_path / "ck") if not n.startswith(".")) == [
        f"epoch=0-step={BATCHES}.ckpt", "last.ckpt"]  # fmt: skip
    assert checkpointer.load(tmp_path / "ck" / "last.ckpt")["global_step"] == step
