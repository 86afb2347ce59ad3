"""Verify throughput and peak memory: ``checkpointer verify`` beside raw reading of the same bytes.

Time: verifying every checksum of a checkpoint (``verify_checkpoint``, what ``checkpointer
verify`` runs) against reading its data file through a reused 8 MiB buffer (the raw baseline:
the disk's or page cache's speed, no checksum) and against a verified full load. Memory: each
in a fresh subprocess, the peak resident memory above the process's before the call
(``VmHWM`` after resetting it): verification must not grow with the checkpoint.

Run alone: ``python benchmarks/bench_verify.py [--large] [--rounds N]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import numpy as np  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.load import verify_checkpoint  # noqa: E402
from checkpointer.storage import open_store  # noqa: E402

_CHUNK = 8 * common.MiB

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_verify
method, d = sys.argv[2], sys.argv[3]
fn = bench_verify.methods(d)[method]
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
open("/proc/self/clear_refs", "w").write("5")
before = status()["VmRSS"]
fn()
print(json.dumps({"extra": status()["VmHWM"] - before}))
"""


def _raw_chunks(path: str) -> None:
    buf = memoryview(np.empty(_CHUNK, dtype=np.uint8))  # type: ignore[arg-type]
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def methods(d: str) -> dict[str, common.Method]:
    """The timed methods over the checkpoint ``d/ckpt`` written by :func:`run`."""
    ckpt = os.path.join(d, "ckpt")
    files = [os.path.join(ckpt, n) for n in sorted(os.listdir(ckpt)) if n.endswith(".safetensors")]
    return {
        "raw read (8 MiB buffer)": lambda: [_raw_chunks(p) for p in files],
        "checkpointer verify": lambda: verify_checkpoint(open_store(d), "ckpt"),
        "checkpointer.load (verify)": lambda: checkpointer.load(ckpt),
    }


def _peak(method: str, d: str) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _CHILD, here, method, d], capture_output=True,
                         text=True, timeout=600, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


def run(large: bool = False, rounds: int = 3, only: Sequence[str] | None = None) -> list[common.Row]:
    size = (1024 if large else 256) * common.MiB
    name = f"f32x200-{size // common.MiB}MiB"
    d = os.path.join(common.workdir(), "verify")
    common.remove(d)
    os.makedirs(d)
    state = common.mixed_state(size)
    checkpointer.save(os.path.join(d, "ckpt"), state)
    nbytes = common.nbytes_of(state)
    del state
    m = methods(d)
    times = common.bench(m, rounds=rounds)
    rows = common.rows_from("verify (warm)", name, nbytes, times, "raw read (8 MiB buffer)")
    for row in rows:
        extra = _peak(row.method, d)
        row.note = f"peak {extra / common.MiB:.1f} MiB extra"
        row.extra = {"extra_bytes": extra}
    common.remove(d)
    return rows


if __name__ == "__main__":
    common.state_scenario_main(__doc__, run)
