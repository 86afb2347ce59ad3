"""Peak extra memory of each save and load method, each in a fresh subprocess.

The child builds (or, for loads, finds on disk) the state, resets the kernel's peak-RSS
mark (``/proc/self/clear_refs`` = 5), runs the method once and reports ``VmHWM - VmRSS``
taken just before: the extra resident memory the method needed. For loads the returned
state itself is subtracted, leaving the loader's own overhead. Goal for a synchronous
save: at most max(64 MiB, 2% of the state).

Run alone: ``python benchmarks/bench_memory.py [--large]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_CHILD = r"""
import gc, json, os, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import common, bench_save, bench_load, checkpointer
method, d, size = sys.argv[2], sys.argv[3], int(sys.argv[4])

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

if method.startswith("save:"):
    state = common.mixed_state(size)
    m, _ = bench_save.methods(state, d)
    if method == "save:checkpointer async":
        mgr = checkpointer.CheckpointManager(os.path.join(d, "mgr"), async_save=True, keep_last=1)
        fn = lambda: (mgr.save(state, step=1), mgr.wait())
    else:
        fn = m[method[5:]]
    result_bytes = 0
else:
    m, _ = bench_load.methods(json.loads(sys.argv[5]))
    fn = m[method[5:]]
    result_bytes = size
import torch, safetensors.numpy  # imported up front: libraries' own import cost is not counted
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
before = status()["VmRSS"]
out = fn()
peak = status()["VmHWM"]
print(json.dumps({"extra": peak - before - result_bytes}))
"""

SAVES = [
    "raw os.write+fsync",
    "checkpointer",
    "checkpointer async",
    "safetensors save_file",
    "torch.save",
    "np.savez",
]
LOADS = [
    "raw readinto",
    "checkpointer",
    "safetensors load_file",
    "torch.load(weights_only)",
    "np.load",
]


def _child(method: str, d: str, size: int, paths: dict[str, str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    args = [sys.executable, "-c", _CHILD, here, method, d, str(size)]
    if paths is not None:
        args.append(json.dumps(paths))
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{method}: {out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


def run(large: bool = False, rounds: int = 1, only: list[str] | None = None) -> list[common.Row]:
    import bench_load

    size = (1024 if large else 256) * common.MiB
    name = f"f32x200-{size // common.MiB}MiB"
    d = os.path.join(common.workdir(), "memory")
    common.remove(d)
    os.makedirs(d)
    rows = []
    nbytes = common.nbytes_of(common.mixed_state(size))
    goal = max(64 * common.MiB, nbytes // 50)
    for m in SAVES:
        extra = _child("save:" + m, d, size)
        row = common.Row(
            "peak memory: save", name, "", nbytes, [0.0], note=f"{extra / common.MiB:.1f} MiB extra"
        )
        row.method, row.extra = m, {"extra_bytes": extra, "goal_bytes": goal}
        rows.append(row)
    paths = bench_load._write_all(common.mixed_state(size), d)
    for m in LOADS:
        extra = _child("load:" + m, d, size, paths)
        row = common.Row(
            "peak memory: load",
            name,
            "",
            nbytes,
            [0.0],
            note=f"{extra / common.MiB:.1f} MiB beyond the result",
        )
        row.method, row.extra = m, {"extra_bytes": extra}
        rows.append(row)
    common.remove(d)
    return rows


def table(rows: list[common.Row]) -> str:
    lines = ["| scenario | state | method | peak extra MiB |", "|---|---|---|---:|"]
    lines += [
        f"| {r.scenario} | {r.state} | {r.method} | {r.extra['extra_bytes'] / common.MiB:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="1 GiB state instead of 256 MiB")
    args = ap.parse_args()
    print(table(run(args.large)))


if __name__ == "__main__":
    main()
