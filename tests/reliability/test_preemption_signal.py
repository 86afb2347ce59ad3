"""Real signals to real child processes: a training loop that saves at the signal and stops.

The child trains with ``every_n_steps=10_000`` (no scheduled save would come) and
``save_on_preemption=True``; the parent sends SIGTERM (or SIGUSR1) at a random moment. The
child must save at the next step boundary (0 steps lost), exit normally, and a new run must
resume from that step.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpointer
from checkpointer import CheckpointManager

CHILD = r"""
import signal, sys, time
import numpy as np
from checkpointer import CheckpointManager

directory, async_save = sys.argv[1], sys.argv[2] == "async"
current = {"step": 0, "at_signal": None}

def note(signum, frame):  # installed first: the manager chains it
    if current["at_signal"] is None:
        current["at_signal"] = current["step"]

signal.signal(signal.SIGTERM, note)
signal.signal(signal.SIGUSR1, note)
mgr = CheckpointManager(directory, every_n_steps=10_000, async_save=async_save, save_on_preemption=True)
start = mgr.latest.step if mgr.latest else 0
w = np.zeros(1 << 16, np.float32)
print("ready", flush=True)
for step in range(start + 1, start + 100_000):
    current["step"] = step
    w += 1.0  # a step of work
    time.sleep(0.002)
    mgr.step_end(step, lambda: {"w": w, "step": step})
    if mgr.preempted:
        print("preempted", mgr.latest.step, current["at_signal"], flush=True)
        break
mgr.close()
"""


def _run_until_signal(directory: Path, mode: str, sig: signal.Signals, delay: float) -> tuple[int, int]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay)
    os.kill(child.pid, sig)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-3000:]
    _, saved, at_signal = out.split()
    return int(saved), int(at_signal)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_save_happens_at_the_signal_and_a_new_run_resumes(tmp_path: Path, mode: str) -> None:
    rng = random.Random(7)
    for trial, sig in enumerate([signal.SIGTERM, signal.SIGUSR1]):
        directory = tmp_path / f"run{trial}"
        saved, at_signal = _run_until_signal(directory, mode, sig, rng.uniform(0.05, 0.3))
        assert saved - at_signal in (0, 1), (saved, at_signal)  # the step under way, or the next
        latest = CheckpointManager(directory).latest
        assert latest is not None and latest.step == saved
        assert checkpointer.load(directory / latest.name)["step"] == saved
        again, _ = _run_until_signal(directory, mode, signal.SIGTERM, 0.05)  # resumes, then stops
        assert again > saved
        assert [c.step for c in CheckpointManager(directory).checkpoints] == [saved, again]
