"""JAX with two processes (jax.distributed on 127.0.0.1, CPU devices, gloo collectives)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager

pytest.importorskip("jax")
WORKER = Path(__file__).with_name("_jax_worker.py")


def _two_processes(*args: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PORT": str(port), "PROC": str(i)})
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]


def test_sharded_jax_array_saved_by_two_processes_restores_onto_another_sharding(tmp_path):
    directory = tmp_path / "ckpts"
    _two_processes("save", str(directory))
    expected = np.arange(48, dtype=np.float32).reshape(8, 6) / 7
    ckpt = directory / "step-000000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["data-00000.safetensors", "data-r00001-00000.safetensors", "manifest.msgpack"]
    # one process, no JAX needed: the whole array
    state = CheckpointManager(directory).restore("latest").state
    assert np.array_equal(state["x"], expected) and state["step"] == 2
    _two_processes("restore", str(directory), str(tmp_path / "out"))
    assert np.array_equal(checkpointer.load(tmp_path / "out")["x_first_rows"], expected[:2])


def test_async_saves_of_two_jax_processes(tmp_path):
    directory = tmp_path / "ckpts"
    _two_processes("async", str(directory))
    expected = np.arange(48, dtype=np.float32).reshape(8, 6) / 7
    for step in (2, 3):
        state = checkpointer.load(directory / f"step-{step:09d}")
        assert np.array_equal(state["x"], expected * step) and state["step"] == step
