"""Lazy access: open a 1 GiB checkpoint and read one small tensor (goal: under 20 ms).

Methods: ``checkpointer.open(url).tensor(key)`` (manifest read and verified, one tensor
read and its crc32c checked), safetensors ``safe_open(...).get_tensor(key)``, and the floor:
``os.pread`` of the tensor's bytes at an offset known in advance. Warm (page cache) and
cold (every file evicted with ``posix_fadvise(DONTNEED)`` before each call, untimed).

Run alone: ``python benchmarks/bench_lazy.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.reader import open as ck_open  # noqa: E402
from checkpointer.tree import path_key  # noqa: E402


def run(large: bool = False, rounds: int = 10, only: list[str] | None = None) -> list[common.Row]:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    d = os.path.join(common.workdir(), "lazy")
    os.makedirs(d, exist_ok=True)
    state = common.mixed_state(1024 * common.MiB)
    want = state["small100/bias"].copy()
    key = path_key(["small100/bias"])  # the tensor key of that tree path
    ck, st = os.path.join(d, "ck"), os.path.join(d, "st.safetensors")
    checkpointer.save(ck, state)
    save_file(state, st)
    del state
    with ck_open(ck) as r:
        t = next(t for t in r.manifest.tensors if t.key == key)
    data_file, begin, end = os.path.join(ck, t.file), t.begin, t.end

    def ck_one() -> np.ndarray:
        with ck_open(ck) as r:
            return r.tensor(key)

    def st_one() -> np.ndarray:
        with safe_open(st, "np") as f:
            return f.get_tensor("small100/bias")

    def pread_one() -> np.ndarray:
        fd = os.open(data_file, os.O_RDONLY)
        try:
            return np.frombuffer(os.pread(fd, end - begin, begin), dtype=np.float32)
        finally:
            os.close(fd)

    for fn in (ck_one, st_one, pread_one):
        np.testing.assert_array_equal(fn(), want)
    m = {
        "os.pread (offset known)": pread_one,
        "checkpointer.open+tensor": ck_one,
        "safetensors safe_open+get_tensor": st_one,
    }
    files = {
        "os.pread (offset known)": [ck],
        "checkpointer.open+tensor": [ck],
        "safetensors safe_open+get_tensor": [st],
    }
    m.update({f"{k} (cold)": v for k, v in list(m.items())})

    def setup(method: str) -> None:
        if method.endswith("(cold)"):
            for f in files[method.removesuffix(" (cold)")]:
                common.drop_cache(f)

    times = common.bench(m, rounds=rounds, setup=setup)
    nbytes = want.nbytes
    warm = {k: v for k, v in times.items() if not k.endswith("(cold)")}
    cold = {k: v for k, v in times.items() if k.endswith("(cold)")}
    rows = common.rows_from(
        "lazy 1 tensor of 1GiB", "f32x200-1024MiB", nbytes, warm, "os.pread (offset known)"
    )
    rows += common.rows_from(
        "lazy 1 tensor of 1GiB (cold)",
        "f32x200-1024MiB",
        nbytes,
        cold,
        "os.pread (offset known) (cold)",
    )
    common.remove(ck)
    common.remove(st)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    print(common.table(run(rounds=args.rounds)))


if __name__ == "__main__":
    main()
