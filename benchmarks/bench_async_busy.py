"""Async saving beside a training loop that keeps every core busy: does the writer's priority matter?

``bench_async`` times a loop of single-threaded steps, which leaves the writer thread a core
of its own. Here each step runs two BLAS-bound halves on two threads (both cores of this VM
busy), and a 256 MiB state (``--mib``) is saved every ~1.5 s: synchronously, and with
``async_save=True`` with the writer thread at several priorities, set by replacing the
writer thread's initializer (``async_save._lower_priority``): nice 0, nice 5 (as shipped),
nice 19, and ``SCHED_IDLE`` (Linux); and, at nice 5, two ways of spreading the writer's
work: smaller writes (1 MiB ``os.write`` calls instead of one per large tensor) and paced
writeback (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` after every 8 MiB, through libc: the
kernel starts writing those pages at once instead of in one burst at the ``fsync``), each
set by replacing ``LocalWriter._write_all`` for that run. Each save's net stall is its blocking time plus the
extra time of the steps in the window after it (~1.2 s) over the median step before it, as
in ``bench_async``; the first save of each run (which allocates the staging arena) is left
out. Rounds alternate the order. Reported: median and best net stall, and the share of the
synchronous stall (median) each variant removes.

    python benchmarks/bench_async_busy.py [--mib 256] [--rounds 3] [--saves 5]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # each half of a step on one core

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from checkpointer import CheckpointManager, async_save, localio  # noqa: E402

SYNC = "sync save"


def _nice(n: int) -> Callable[[], None]:
    def set_nice() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, n)
    return set_nice


def _idle() -> None:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]


VARIANTS: dict[str, Callable[[], None]] = {"async, writer nice 0": _nice(0), "async, writer nice 5 (shipped)": _nice(5),
                                           "async, writer nice 19": _nice(19)}
if hasattr(os, "SCHED_IDLE"):
    VARIANTS["async, writer SCHED_IDLE"] = _idle
_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2


def _chunked_writes(chunk: int, paced: bool) -> Callable[[localio.LocalWriter, memoryview], None]:
    """A ``LocalWriter._write_all`` writing ``chunk`` bytes per call (``paced``: and asking
    the kernel to start writing each chunk back right away)."""
    def write_all(self: localio.LocalWriter, view: memoryview) -> None:
        self._synced = False
        while view:
            start = os.lseek(self.fd, 0, os.SEEK_CUR)
            n = os.write(self.fd, view[:chunk])
            if paced:
                _libc.sync_file_range(self.fd, ctypes.c_int64(start), ctypes.c_int64(n), _SYNC_FILE_RANGE_WRITE)
            view = view[n:]
    return write_all


WRITES: dict[str, Callable[[localio.LocalWriter, memoryview], None]] = {
    "async, nice 5, 1 MiB writes": _chunked_writes(1 << 20, False),
    "async, nice 5, paced writeback (8 MiB)": _chunked_writes(8 << 20, True),
}
for _name in WRITES:
    VARIANTS[_name] = _nice(5)


@contextlib.contextmanager
def _writes(kind: str) -> Any:
    real = localio.LocalWriter._write_all
    if kind in WRITES:
        localio.LocalWriter._write_all = WRITES[kind]  # type: ignore[method-assign]
    try:
        yield
    finally:
        localio.LocalWriter._write_all = real  # type: ignore[method-assign]


def _stepper() -> Callable[[], None]:
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((384, 384), dtype=np.float32) for _ in range(2)]
    pool = ThreadPoolExecutor(2)

    def half(m: np.ndarray) -> np.ndarray:
        for _ in range(3):
            m = np.tanh(m @ m * 0.01)
        return m

    def step() -> None:
        list(pool.map(half, mats))
    return step


def _run(directory: str, state: dict[str, np.ndarray], step: Callable[[], None], every: int, window: int,
         saves: int, prio: Callable[[], None] | None) -> list[float]:
    """Net stall of each save after the first."""
    real = async_save._lower_priority
    if prio is not None:
        async_save._lower_priority = prio  # read when the writer thread starts
    try:
        mgr = CheckpointManager(directory, keep_last=1, every_n_epochs=None, async_save=prio is not None)
        durations, blocking, at = [], [], []
        for s in range(1, every * saves + window + 1):
            t = time.perf_counter()
            step()
            durations.append(time.perf_counter() - t)
            if s % every == 0 and s <= every * saves:
                t = time.perf_counter()
                mgr.save(state, step=s)
                blocking.append(time.perf_counter() - t)
                at.append(s)
        mgr.close()
    finally:
        async_save._lower_priority = real
    stalls = [b + sum(durations[s:s + window]) - window * statistics.median(durations[s - window:s])
              for b, s in zip(blocking, at, strict=True)]
    return stalls[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    state = common.mixed_state(args.mib * common.MiB)
    step = _stepper()
    for _ in range(10):
        step()
    t = time.perf_counter()
    for _ in range(20):
        step()
    step_s = (time.perf_counter() - t) / 20
    every, window = max(10, round(1.5 / step_s)), max(5, round(1.2 / step_s))
    print(f"step {step_s * 1e3:.1f} ms on 2 threads; a save every {every} steps; window {window} steps")
    d = os.path.join(common.workdir(), "async-busy")
    common.remove(d)
    kinds: list[str] = [SYNC, *VARIANTS]
    stalls: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            with _writes(kind):
                stalls[kind] += _run(os.path.join(d, str(kinds.index(kind))), state, step, every, window,
                                     args.saves, VARIANTS.get(kind))
    common.remove(d)
    sync = statistics.median(stalls[SYNC])
    print("| method | net stall median ms | best ms | share of the sync stall removed (median) |")
    print("|---|---:|---:|---:|")
    for kind, v in stalls.items():
        print(f"| {kind} | {statistics.median(v) * 1e3:.0f} | {min(v) * 1e3:.0f} | "
              f"{1 - statistics.median(v) / sync:+.0%} |")


if __name__ == "__main__":
    main()
