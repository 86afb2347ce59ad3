"""Keras callbacks with ``save_on_preemption=True``: a real SIGTERM sent to a real ``fit``.

The child (``keras_preempt_child.py``, JAX backend: Keras reads ``KERAS_BACKEND`` at import,
so this process never imports Keras) trains with ``BackupAndRestore`` (synchronous) and two
``ModelCheckpoint`` callbacks (Keras ``.weights.h5`` files and this project's format, both
``async_save=True``) whose schedules would not save mid-epoch. The signal comes in the
middle of epoch 2. Each callback must save at the next batch end (0 steps lost), training
must stop there and the child exit 0; a new process resumes from the backup mid-epoch and
must end with exactly (bit for bit) the weights of a run that was never interrupted.
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
from checkpointer import CheckpointManager

HERE = Path(__file__).parent
CHILD = HERE / "keras_preempt_child.py"
BATCHES = 8  # per epoch in the child
ENV = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONHASHSEED": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip

pytestmark = pytest.mark.skipif(  # found, not imported: Keras is for the child alone
    any(importlib.util.find_spec(m) is None for m in ("keras", "jax")),
    reason="keras or jax is not installed")


def _child(mode: str, root: Path, *, signal_at_ready: bool = False) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, str(CHILD), mode, str(root)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    try:
        if signal_at_ready:
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")
            os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_a_signal_saves_at_the_next_batch_stops_fit_and_the_next_run_resumes_exactly(
    tmp_path: Path,
) -> None:
    got = _child("preempt", tmp_path, signal_at_ready=True)
    step = got["step"]
    # the signal came after the callbacks' hooks of batch at_signal: they saved at the next
    # batch end, the first after the signal (0 steps lost)
    assert step == got["at_signal"] + 1, got
    assert got["preempted"] == [True, True, True] and got["epochs"] == 2, got
    assert step == BATCHES + 3, got  # batch 3 of epoch 2: mid-epoch
    assert got["handler_restored"], "the callbacks left a signal handler behind"

    backup = CheckpointManager(tmp_path / "backup").latest
    assert backup is not None and backup.step == step
    state = checkpointer.load(backup.url)
    assert (state["epoch"], state["batch"], state["step"]) == (1, step - BATCHES, step)
    # the Keras file's name is filled with the batch of the stop; the schedule never saves
    assert got["files"] == [f"m-e2-b{step - BATCHES}.weights.h5"]
    # save_best_only saved epoch 1, then the preemption save (forced, unranked: no val_loss)
    assert [c.step for c in CheckpointManager(tmp_path / "managed").checkpoints] == [BATCHES, step]

    again = _child("resume", tmp_path)
    assert again["file_vs_stop"] == 0.0 and again["managed_vs_stop"] == 0.0, again
    assert again["resumed_epochs"] == [1, 2], again  # resumed in epoch 2, after its batches
    assert again["resumed_vs_straight"] == 0.0, again  # bit for bit
    assert again["preempted"] is False and again["backup_left"] is False, again
    refused = again["refused"]
    assert len(refused) == 4 and all(r.startswith("ConfigurationError") for r in refused), refused
    assert "save_on_preemption must be True or False" in refused[0]
    assert "SIGKILL cannot be caught" in refused[1]
    assert all("would replace the best model" in r for r in refused[2:]), refused
    # a signal with no batch end before the epoch end: the epoch-end backup (epoch 2 starts
    # at its batch 0), the file named by the epoch's last batch, and fit stops there
    end = again["at_epoch_end"]
    assert end["epochs"] == 1 and end["preempted"] == [True, True], end
    assert end["backup"] == [1, 0, BATCHES], end
    assert end["files"] == [f"m-e1-b{BATCHES}.weights.h5"], end
