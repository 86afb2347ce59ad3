"""One large state (10 GiB by default): time and peak memory of each operation, once.

A 10 GiB float32 state (4 tensors of ~2.4 GiB and 196 small ones, the suite's layout, filled
without a random generator) is saved durably through ``checkpointer.save`` beside a raw
``os.write`` + ``fsync`` of the same bytes, then checked with ``verify_checkpoint`` (what ``checkpointer verify`` runs), read
one tensor lazily (``checkpointer.open``) and loaded eagerly (verified) after the state is
freed. Peak memory: the process's peak resident set (``VmHWM``, its mark reset through
``/proc/self/clear_refs`` before each operation) beyond the resident set just before it,
minus the result's own bytes for the eager load. Saves: two rounds each, best counted; the rest once. This shows that memory stays
bounded at this size, it is not a speed comparison.

    python benchmarks/bench_big.py [--gib 10]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.load import verify_checkpoint  # noqa: E402
from checkpointer.storage import open_store  # noqa: E402


def _state(nbytes: int) -> dict[str, np.ndarray]:
    small = (nbytes * 6 // 100) // 196 // 4
    large = (nbytes // 4 - small * 196) // 4 // 256 * 256
    out = {f"layer{i}/weight": np.full((large // 256, 256), i + 0.5, np.float32) for i in range(4)}
    for i in range(196):
        out[f"small{i:03d}/bias"] = np.arange(small, dtype=np.float32)
    return out


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _measure(name: str, fn: Callable[[], Any], result_bytes: int = 0) -> tuple[float, int, Any]:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status()["VmRSS"]
    t = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t
    extra = _status()["VmHWM"] - before - result_bytes
    print(f"| {name} | {took:.2f} | {extra / common.MiB:.1f} |", flush=True)
    return took, extra, out


def _saves(d: str, nbytes: int) -> tuple[float, float, int]:
    state = _state(nbytes)
    total = common.nbytes_of(state)
    print(f"state: {total / 2**30:.2f} GiB in {len(state)} tensors\n")
    print("| operation | seconds | peak extra MiB |\n|---|---:|---:|")
    def raw_write() -> None:
        common.raw_write(os.path.join(d, "raw"), list(state.values()), True)

    raws, cks = [], []
    for i in range(2):  # the first write of each pays for fresh disk blocks: the best of two counts
        raws.append(_measure(f"raw os.write + fsync (baseline), {i + 1} of 2", raw_write)[0])
        os.unlink(os.path.join(d, "raw"))
        cks.append(_measure(f"checkpointer.save (durable), {i + 1} of 2",
                            partial(checkpointer.save, os.path.join(d, f"ck{i}"), state))[0])
    common.remove(os.path.join(d, "ck0"))  # a new name each time: no replacement in the timing
    os.rename(os.path.join(d, "ck1"), os.path.join(d, "ck"))
    return min(raws), min(cks), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=int, default=10)
    args = parser.parse_args()
    nbytes = args.gib << 30
    d = os.path.join(common.workdir(), "big")
    common.remove(d)
    os.makedirs(d)
    raw, ck, total = _saves(d, nbytes)  # the state is freed when it returns
    gc.collect()
    _measure("checkpointer verify", lambda: verify_checkpoint(open_store(d), "ck"))
    _measure("checkpointer.open + one small tensor",
             lambda: checkpointer.open(os.path.join(d, "ck")).tensor("small000~1bias"))  # the key "small000/bias", "/" escaped
    _measure("checkpointer.load (verified, eager)", lambda: checkpointer.load(os.path.join(d, "ck")), total)
    print(f"\nsave {ck:.2f} s, raw write + fsync {raw:.2f} s (best of two each; on a VM disk mounted with "
          "discard, each write also pays for freeing the blocks of files deleted before it)")
    common.remove(d)


if __name__ == "__main__":
    main()
