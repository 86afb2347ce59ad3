"""Resharding reads: a table saved as 4 row pieces, restored as 3 row boxes.

A 256 MiB float32 table (``--mib``) is saved as 4 row pieces (as 4 ranks would write it),
then each of 3 "ranks" restores its third of the rows through ``restore(template=...)``
(one process plays the ranks in turn). Side by side, in the same process and alternating
order: the raw baseline, ``os.preadv`` of exactly those rows from the data file into a
preallocated array (the least any reader must read), and the checkpointer with and without
verification. Page cache warm for every method. Reported per method: best and median of the
rounds for the 3 restores together, ratio raw / method, and the bytes read per byte needed.

    python benchmarks/bench_reshard.py [--mib 256] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpointer import CheckpointManager  # noqa: E402
from checkpointer.manifest import read_manifest  # noqa: E402
from checkpointer.sharding import Shard, ShardedArray, ShardSpec  # noqa: E402
from checkpointer.storage import LocalStore, open_store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    cols = 1024
    rows = args.mib * 1024 * 1024 // 4 // cols
    full = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    cut = [rows * i // 4 for i in range(5)]
    boxes = [((rows * i // 3, 0), (rows * (i + 1) // 3 - rows * i // 3, cols)) for i in range(3)]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        shards = tuple(Shard((a, 0), full[a:b]) for a, b in zip(cut, cut[1:], strict=False))
        mgr = CheckpointManager(d)
        name = mgr.save({"t": ShardedArray(full.shape, full.dtype, shards)}, step=0).name
        manifest = read_manifest(open_store(d), name)
        pieces = {t.key: t for t in manifest.tensors}
        offsets = {p.key: p.offsets for s in manifest.shards for p in s.pieces}
        needed = sum(n[0] for _, n in boxes) * cols * 4
        counted = {"n": 0}
        real_open = LocalStore.open_read

        def counting_open(store: LocalStore, rel: str) -> Any:
            f = real_open(store, rel)
            real_readinto = f.readinto  # type: ignore[attr-defined]

            def readinto(b: Any) -> int:
                n: int = real_readinto(b)
                counted["n"] += n
                return n
            f.readinto = readinto  # type: ignore[attr-defined]
            return f

        def raw() -> None:
            for (r0, _), (n, _) in boxes:
                out = np.empty((n, cols), np.float32)
                view, at = memoryview(out.reshape(-1).view(np.uint8)), 0
                for key, t in pieces.items():  # the rows of each piece inside the box
                    p0, p1 = offsets[key][0], offsets[key][0] + t.shape[0]
                    lo, hi = max(r0, p0), min(r0 + n, p1)
                    if lo >= hi:
                        continue
                    fd = os.open(os.path.join(d, name, t.file), os.O_RDONLY)
                    want = (hi - lo) * cols * 4
                    got = os.preadv(fd, [view[at:at + want]], t.begin + (lo - p0) * cols * 4)
                    os.close(fd)
                    assert got == want
                    counted["n"] += got
                    at += want

        def ours(verify: bool) -> None:
            reader = CheckpointManager(d)
            for box in boxes:
                spec = ShardSpec(full.shape, full.dtype, (box,))
                reader.restore("latest", template={"t": spec}, verify=verify)

        methods = {"raw preadv of the rows": raw,
                   "checkpointer (verified)": lambda: ours(True),
                   "checkpointer (verify=False)": lambda: ours(False)}
        times: dict[str, list[float]] = {m: [] for m in methods}
        ratio_read: dict[str, float] = {}
        LocalStore.open_read = counting_open  # type: ignore[method-assign]
        try:
            for i in range(args.rounds + 1):  # round 0 warms the page cache
                order = list(methods) if i % 2 else list(reversed(methods))
                for m in order:
                    counted["n"] = 0
                    t0 = time.perf_counter()
                    methods[m]()
                    if i:
                        times[m].append(time.perf_counter() - t0)
                    ratio_read[m] = counted["n"] / needed
        finally:
            LocalStore.open_read = real_open  # type: ignore[method-assign]
    base = min(times["raw preadv of the rows"])
    rows_out = [{"method": m, "best_s": min(t), "median_s": statistics.median(t), "ratio_best": base / min(t),
                 "bytes_read_per_needed": ratio_read[m]} for m, t in times.items()]
    print(f"{args.mib} MiB in 4 row pieces, restored as 3 row boxes (warm cache, {args.rounds} rounds)")
    print(f"{'method':<28} {'best':>8} {'median':>8} {'x raw':>6} {'read/needed':>12}")
    for r in rows_out:
        print(f"{r['method']:<28} {r['best_s'] * 1e3:>6.1f}ms {r['median_s'] * 1e3:>6.1f}ms "
              f"{r['ratio_best']:>6.2f} {r['bytes_read_per_needed']:>12.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
