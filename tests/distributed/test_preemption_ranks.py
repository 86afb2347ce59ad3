"""Preemption with two real torchrun ranks (gloo): SIGTERM sent to one worker process only.

Each rank trains a DDP model and a DTensor table sharded over both ranks, with
``save_on_preemption=True`` and no scheduled save in sight. The parent signals one rank's pid
(not torchrun's: torchrun forwards a SIGTERM it gets to every worker). Both ranks must stop at
the same step with one checkpoint of that step, holding both ranks' pieces, 0 steps lost, and
exit 0. One torchrun launch runs every case in turn (starting torch costs more than a run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch.distributed")

WORKER = Path(__file__).with_name("_preempt_worker.py")
CASES = [("sync", 1), ("async", 1), ("sync", 0), ("async", 0)]  # (mode, the rank signalled)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_pids(out: Path, run: int, proc: subprocess.Popen[str]) -> list[int]:
    files = [out / f"pid{run}-{r}" for r in range(2)]
    deadline = time.monotonic() + 120  # torchrun's start on a loaded machine, not a timing check
    while time.monotonic() < deadline and proc.poll() is None:
        if all(f.exists() and f.read_text() for f in files):
            return [int(f.read_text()) for f in files]
        time.sleep(0.02)
    proc.kill()
    stdout, stderr = proc.communicate()
    raise AssertionError(f"run {run} never became ready:\n{stdout[-3000:]}{stderr[:6000]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict[str, Any]]], list[int]]:
    tmp = tmp_path_factory.mktemp("preempt")
    directory, out = tmp / "ckpts", tmp / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(WORKER),
           str(directory), str(out), *(mode for mode, _ in CASES)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    rng, pids = random.Random(13), []
    for run, (_, signalled) in enumerate(CASES):
        pids = _wait_for_pids(out, run, proc)
        time.sleep(rng.uniform(0.05, 0.25))  # somewhere in a step: work, DDP's all-reduce, a save point
        os.kill(pids[signalled], signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:] + stderr[:6000]  # every rank exited 0
    results = [[json.loads((out / f"rank{run}-{r}.json").read_text()) for r in range(2)]
               for run in range(len(CASES))]
    return directory, results, [proc.pid, *pids]


@pytest.mark.parametrize("run", range(len(CASES)), ids=[f"{m}-rank{r}" for m, r in CASES])
def test_sigterm_on_one_rank_saves_one_checkpoint_on_every_rank(runs: Any, run: int) -> None:
    import numpy as np

    import checkpointer

    directory, results, (torchrun, *workers) = runs
    assert torchrun not in workers and results[run][0]["pid"] != results[run][1]["pid"]
    signalled = CASES[run][1]
    hit, other = results[run][signalled], results[run][1 - signalled]
    assert other["at_signal"] is None  # only one process got the signal
    stopped = hit["stopped"]
    assert stopped is not None and other["stopped"] == stopped  # preempted at the same call
    assert stopped - hit["at_signal"] in (0, 1)  # the step under way, or the next: 0 steps lost
    for r in results[run]:
        assert r["saved"] == [stopped]  # nothing saved before: the one save is the preemption's
        assert r["name"] == r["later"] == f"step-{stopped:09d}"  # later calls: the same info
        assert r["names"] == [r["name"]] and r["nbytes"] > 0  # committed before the loop stopped
    here = directory / f"run{run}"
    assert sorted(p.name for p in here.iterdir()) == [".ckpt-index.msgpack", hit["name"]]
    state = checkpointer.load(here / hit["name"])
    assert state["step"] == stopped
    base = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    assert np.array_equal(state["table"], base + stopped)  # both ranks' rows, of that step
    assert state["model"]["weight"].shape == (4, 8)
