"""The command line: demo, ls, inspect, verify (exit codes and output)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.cli import main


@pytest.fixture()
def run_dir(tmp_path):
    d = str(tmp_path / "run")
    with CheckpointManager(d, monitor="val_loss", keep_best=2) as mgr:
        for epoch, loss in enumerate([0.9, 0.5, 0.7, 0.4], start=1):
            mgr.epoch_end(epoch, {"w": np.full((2, 3), epoch, np.float32), "step": epoch * 10},
                          step=epoch * 10, metrics={"val_loss": loss})
    return d


def test_ls_marks_latest_and_best(run_dir, capsys):
    assert main(["ls", run_dir]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["NAME", "STEP", "EPOCH", "METRICS", "SIZE"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == {"step-000000020", "step-000000040"}
    assert rows["step-000000040"].endswith("latest,best")
    assert "val_loss=0.5" in rows["step-000000020"]


def test_inspect_lists_tensors(run_dir, capsys):
    assert main(["inspect", os.path.join(run_dir, "step-000000040")]) == 0
    out = capsys.readouterr().out
    assert "w  " in out and "F32" in out and "2x3" in out and "24" in out
    assert "val_loss=0.4" in out


def test_verify_ok_then_detects_a_flipped_byte(run_dir, capsys):
    assert main(["verify", run_dir]) == 0
    assert "2 verified, 0 failed" in capsys.readouterr().out
    data = os.path.join(run_dir, "step-000000040", "data-00000.safetensors")
    raw = bytearray(open(data, "rb").read())
    raw[-1] ^= 0x01
    open(data, "wb").write(bytes(raw))
    assert main(["verify", run_dir]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "step-000000040" in out and "1 verified, 1 failed" in out
    assert main(["verify", os.path.join(run_dir, "step-000000040")]) == 1


def test_verify_empty_directory_fails(tmp_path):
    assert main(["verify", str(tmp_path)]) == 1


def test_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_demo_learns_interrupts_and_resumes(tmp_path):
    d = str(tmp_path / "demo")
    proc = subprocess.run([sys.executable, "-m", "checkpointer", "demo", d],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "interrupted after epoch 5" in out
    assert "resumed from epoch05" in out and "continuing at epoch 6" in out
    assert "0 failed" in out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("epoch ")]
    assert losses[-1] < losses[0] / 2  # it really learns
    mgr = CheckpointManager(d, monitor="val_loss")
    assert mgr.latest.epoch == 12
    assert len(mgr.checkpoints) <= 5
    state = checkpointer.load(mgr.best.url)
    assert state["train"]["params"]["w1"].shape == (2, 64)
