"""Data-parallel runs on torch.distributed (gloo, local processes): decisions made once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("nproc", [2, 4])
def test_ranks_agree_and_only_rank0_writes(tmp_path, nproc):
    directory, out = tmp_path / "ckpts", tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(WORKER), str(directory), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    first = results[0]
    # rank 0's metrics decide: epochs 1, 2 and 4 improve, keep_best=1 + keep_last=1
    assert first["decisions"] == ["epoch-000001", "epoch-000002", "epoch-000003",
                                  "epoch-000004", "epoch-000005"]
    assert first["names"] == ["epoch-000004", "epoch-000005"] and first["best"] == "epoch-000004"
    for r in results[1:]:
        for key in ("decisions", "names", "best", "restored"):
            assert r[key] == first[key], (key, r)
        assert r["state_calls"] == 5  # every rank extracts its state at each save point
    # replicated state is written once, by rank 0: no per-rank data files
    for ckpt in ("epoch-000004", "epoch-000005"):
        assert sorted(p.name for p in (directory / ckpt).iterdir()) == ["data-00000.safetensors", "manifest.msgpack"]
    assert all(r["restored_rank"] == 0 for r in results)  # every rank restores rank 0's checkpoint
    assert sorted(p.name for p in directory.iterdir()) == [".ckpt-index.msgpack", "epoch-000004", "epoch-000005"]


def _run(nproc: int, worker: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(worker), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_data_parallel_resume_is_bit_exact(tmp_path):
    import numpy as np

    import checkpointer

    worker = WORKER.with_name("_ddp_resume_worker.py")
    _run(2, worker, "first", str(tmp_path / "whole"), str(tmp_path / "ckpts"))
    _run(2, worker, "second", str(tmp_path / "ckpts"), str(tmp_path / "resumed"))
    whole, resumed = checkpointer.load(tmp_path / "whole"), checkpointer.load(tmp_path / "resumed")

    def leaves(tree, path=()):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from leaves(v, (*path, k))
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                yield from leaves(v, (*path, i))
        else:
            yield path, tree

    a, b = dict(leaves(whole)), dict(leaves(resumed))
    assert a.keys() == b.keys()
    for path, value in a.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == b[path].dtype and np.array_equal(value, b[path]), path
        else:
            assert value == b[path], path


def test_async_saves_of_two_ranks_write_in_the_background(tmp_path):
    """async_save=True with two processes: the writes run on each rank's writer thread over
    a process group of their own, while the training loop runs its collectives."""
    import numpy as np

    import checkpointer

    directory, out = tmp_path / "ckpts", tmp_path / "out"
    out.mkdir()
    _run(2, WORKER.with_name("_async_worker.py"), str(directory), str(out))
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["names"] == ["step-000000003", "step-000000004"] and r["async"] == [True] * 4
        assert r["latest_bytes"] > 0
        # rank 0 writes the replicated state and its piece, rank 1 its piece: on writer threads
        assert len(r["writers"]) == 4 and all(n.startswith("checkpointer-save") for n in r["writers"])
    state = checkpointer.load(directory / "step-000000003")
    assert np.array_equal(state["replicated"], np.full(64, 3.0, np.float32))
    assert np.array_equal(state["table"], np.arange(32, dtype=np.float32).reshape(8, 4) * 3)
    assert state["step"] == 3
    state = checkpointer.load(directory / "step-000000004")  # saved after close(), the table overwritten
    assert np.array_equal(state["replicated"], np.full(64, 4.0, np.float32))
    assert np.array_equal(state["table"], np.full((8, 4), -1.0, np.float32)) and state["step"] == 4
