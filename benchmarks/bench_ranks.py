"""Save time against the number of ranks (torch.distributed, gloo, local processes).

A 256 MiB float32 table (``--mib``) is sharded row-wise over N ranks (a DTensor); every
rank saves its piece through one ``CheckpointManager.save`` (one commit for all ranks).
The baseline, side by side in the same processes: every rank ``os.write`` + ``fsync`` of
the same bytes into its own file, then a barrier. Reported: best and median of the
rounds, and the ratio baseline / checkpointer (1.0 = as fast as the raw writes).

    python benchmarks/bench_ranks.py [--ranks 1 2 4] [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def worker(directory: str, mib: int, rounds: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from checkpointer import CheckpointManager
    from checkpointer.adapters.torch import to_state

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = mib * 1024 * 1024 // 4 // 1024
    table = distribute_tensor(torch.ones(rows, 1024), mesh, [Shard(0)])
    local = table.to_local().numpy()
    # keep_last=1: disk blocks are recycled as for the raw rewrite (fresh blocks of a thin
    # virtual disk are much slower to write); deleting the previous checkpoint is timed
    mgr = CheckpointManager(directory, keep_last=1)
    raw_path = os.path.join(directory, f"raw-{rank}.bin")
    times: dict[str, list[float]] = {"checkpointer": [], "raw": []}

    def raw() -> None:
        fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view = memoryview(np.ascontiguousarray(local).reshape(-1).view(np.uint8))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)

    for i in range(rounds + 1):  # round 0 warms up
        for method in (("raw", "checkpointer") if i % 2 else ("checkpointer", "raw")):
            dist.barrier()
            t0 = time.perf_counter()
            if method == "raw":
                raw()
            else:
                mgr.save({"table": to_state({"t": table})["t"]}, step=i)
            dist.barrier()
            if i:
                times[method].append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = []
    for n in args.ranks:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = os.path.join(d, "times.json")
            subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                            "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--worker",
                            d, str(args.mib), str(args.rounds), out],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            with open(out) as f:
                t = json.load(f)
        ck, raw = t["checkpointer"], t["raw"]
        rows.append({"ranks": n, "checkpointer_best_s": min(ck), "checkpointer_median_s": statistics.median(ck),
                     "raw_best_s": min(raw), "raw_median_s": statistics.median(raw),
                     "ratio_best": min(raw) / min(ck), "gib_per_s": args.mib / 1024 / min(ck)})
    print(f"{'ranks':>5}  {'checkpointer best':>17}  {'median':>7}  {'raw best':>8}  {'ratio':>5}  GiB/s")
    for r in rows:
        print(f"{r['ranks']:>5}  {r['checkpointer_best_s']:>16.3f}s  {r['checkpointer_median_s']:>6.3f}s  "
              f"{r['raw_best_s']:>7.3f}s  {r['ratio_best']:>5.2f}  {r['gib_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
