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
        assert r["state_calls"] == 0  # replicated state is extracted and written by rank 0 only
    assert first["state_calls"] == 5
    assert all(r["restored_rank"] == 0 for r in results)  # every rank restores rank 0's checkpoint
    assert sorted(p.name for p in directory.iterdir()) == [".ckpt-index.msgpack", "epoch-000004", "epoch-000005"]
