"""Sharded saves on torch.distributed: 4 ranks write, 2 ranks and 1 process read back."""

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

pytest.importorskip("torch.distributed")
WORKER = Path(__file__).with_name("_sharded_worker.py")


def _torchrun(nproc: int, *args: str, check: bool = True, env: dict | None = None,
              worker: Path = WORKER) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={port}", str(worker), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved_on_4(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    _torchrun(4, "save", str(root / "ckpts"), str(root / "reference"))
    return root


def test_each_rank_writes_only_its_pieces(saved_on_4):
    ckpt = saved_on_4 / "ckpts" / "step-000000002"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == ["data-00000.safetensors", "data-r00001-00000.safetensors",
                     "data-r00002-00000.safetensors", "data-r00003-00000.safetensors", "manifest.msgpack"]
    manifest = checkpointer.manifest.read_manifest(checkpointer.storage.open_store(str(saved_on_4 / "ckpts")),
                                                 "step-000000002")
    replicated = [t for t in manifest.tensors if t.key.startswith("replicated")]
    assert len(replicated) == 1  # a replicated DTensor is written once


def test_single_process_load_gives_full_arrays(saved_on_4):
    reference = checkpointer.load(saved_on_4 / "reference")
    state = CheckpointManager(saved_on_4 / "ckpts").restore("latest").state
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert np.array_equal(state[key].astype(np.float32), value), key


@pytest.mark.parametrize("nproc", [2, 1])
def test_restore_on_fewer_ranks_is_bit_exact(saved_on_4, tmp_path, nproc):
    out = tmp_path / "restored"
    _torchrun(nproc, "restore", str(saved_on_4 / "ckpts"), str(out))
    reference = checkpointer.load(saved_on_4 / "reference")
    restored = checkpointer.load(out)
    for key, value in reference.items():
        assert np.array_equal(restored[key], value), key


def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    directory = tmp_path / "ckpts"
    proc = _torchrun(2, "kill", str(directory), check=False)
    assert proc.returncode != 0
    mgr = CheckpointManager(directory)  # cleans the dead writers' staging folder
    assert [c.step for c in mgr.checkpoints] == [1]
    assert mgr.restore("latest").info.step == 1
    assert sorted(p.name for p in directory.iterdir()) == [".ckpt-index.msgpack", "step-000000001"]


FSDP_WORKER = Path(__file__).with_name("_fsdp_model_worker.py")


@pytest.mark.parametrize("ranks", [(2, 2), (2, 4)])
def test_fully_sharded_model_and_optimizer_through_to_state(tmp_path, ranks):
    """``to_state(model)`` of an FSDP2 model on gloo ranks, restored bit-exact (also onto
    another number of ranks), through a template and through full arrays."""
    saved_on, restored_on = ranks
    directory, reference = tmp_path / "ckpts", tmp_path / "reference"
    _torchrun(saved_on, "save", str(directory), str(reference), worker=FSDP_WORKER)
    expected = checkpointer.load(reference)
    assert {k.split("/")[0] for k in expected} == {"param", "exp_avg", "exp_avg_sq"}
    for mode in ("restore", "full"):
        out = tmp_path / mode
        _torchrun(restored_on, mode, str(directory), str(out), worker=FSDP_WORKER)
        restored = checkpointer.load(out)
        assert set(restored) == set(expected)
        for key, value in expected.items():
            assert restored[key].dtype == value.dtype and np.array_equal(restored[key], value), (mode, key)
