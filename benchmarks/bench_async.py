"""Async saving inside a CPU-bound training loop: blocking time, background time, net stall.

A loop of single-threaded numpy steps saves every ``interval`` seconds' worth of steps
(1.5 s, 3 s with ``--large``: longer than one background save, as in real training) through
a ``CheckpointManager`` (``keep_last=1``), synchronously and with ``async_save=True``, in
alternating order each round. Every step is timed. For each save:

- blocking: time inside ``mgr.save`` (async: steady state, after the first save allocated
  the staging arena), against the baseline ``memcpy`` of the same arrays into reused
  buffers (``np.copyto``, best of three per round);
- background: duration of the background write and commit;
- stall: blocking + the duration of the ``window`` steps that follow the save - ``window``
  x the median step time of the ``window`` steps before it (the window covers the
  background write, ~40% of the interval). A local reference, so the machine's load
  drifting between runs does not enter. Async net stall is compared with the sync stall.

Run alone: ``python benchmarks/bench_async.py [--large] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from checkpointer import CheckpointManager  # noqa: E402
from checkpointer import commit as commit_mod  # noqa: E402


def _step(work: np.ndarray) -> None:
    np.tanh(work, out=work)  # the "training step": single-threaded, releases the GIL
    np.multiply(work, 1.0001, out=work)
    np.sin(work, out=work)


def _loop(
    state: dict[str, np.ndarray],
    work: np.ndarray,
    every: int,
    saves: int,
    window: int,
    mgr: CheckpointManager,
) -> tuple[list[float], list[float]]:
    """``(blocking per save, stall per save)``."""
    durations: list[float] = []
    blocking: list[float] = []
    at: list[int] = []
    for step in range(1, every * saves + window + 1):
        t = time.perf_counter()
        _step(work)
        state["small000/bias"][0] = step
        durations.append(time.perf_counter() - t)
        if step % every == 0 and step <= every * saves:
            t = time.perf_counter()
            mgr.save(state, step=step)
            blocking.append(time.perf_counter() - t)
            at.append(step)
    mgr.wait()
    stalls = []
    for b, s in zip(blocking, at, strict=True):
        before = statistics.median(durations[s - window : s])
        stalls.append(b + sum(durations[s : s + window]) - window * before)
    return blocking, stalls


def run(
    large: bool = False,
    rounds: int = 3,
    only: list[str] | None = None,
    interval: float = 1.5,
    saves: int = 3,
) -> list[common.Row]:
    """``interval``: seconds of training between saves (longer than one background save)."""
    size = (1024 if large else 256) * common.MiB
    name = f"f32x200-{size // common.MiB}MiB"
    state = common.mixed_state(size)
    nbytes = common.nbytes_of(state)
    work = np.random.default_rng(0).standard_normal(1 << 21, dtype=np.float32)
    d = os.path.join(common.workdir(), "async")
    common.remove(d)
    background: list[float] = []
    real = commit_mod.write_checkpoint

    def timed_write(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            background.append(time.perf_counter() - t)

    commit_mod.write_checkpoint = timed_write  # type: ignore[assignment]
    mgrs = {
        "sync": CheckpointManager(os.path.join(d, "sync"), keep_last=1, every_n_epochs=None),
        "async": CheckpointManager(
            os.path.join(d, "async"), keep_last=1, every_n_epochs=None, async_save=True
        ),
    }
    buffers = {k: np.empty_like(a) for k, a in state.items()}

    def memcpy() -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for k, a in state.items():
                np.copyto(buffers[k], a)
            best = min(best, time.perf_counter() - t)
        return best

    res: dict[str, list[float]] = {
        k: []
        for k in (
            "sync blocking",
            "sync stall",
            "async blocking",
            "async stall",
            "async background",
            "memcpy",
        )
    }
    first_blocking = 0.0
    try:
        memcpy()
        t = time.perf_counter()
        for _ in range(20):  # warm-up and calibration of the step
            _step(work)
        step_time = (time.perf_counter() - t) / 20
        scale = 2 if large else 1
        every = max(10, round(interval * scale / step_time))
        window = max(5, round(0.4 * interval * scale / step_time))
        for r in range(rounds + 1):  # round 0: warm-up (arena allocation, first files)
            for kind in ("sync", "async") if r % 2 else ("async", "sync"):
                os.sync()
                background.clear()
                blocking, stalls = _loop(state, work, every, saves, window, mgrs[kind])
                if r == 0:
                    first_blocking = blocking[0] if kind == "async" else first_blocking
                    continue
                res[f"{kind} blocking"].append(statistics.median(blocking))
                res[f"{kind} stall"].append(statistics.median(stalls))
                if kind == "async":
                    res["async background"].append(statistics.median(background))
            if r:
                res["memcpy"].append(memcpy())
    finally:
        commit_mod.write_checkpoint = real  # type: ignore[assignment]
        for m in mgrs.values():
            m.close()
        common.remove(d)
    note = f"step {step_time * 1e3:.1f} ms, a save every {every} steps, window {window} steps"
    rows = common.rows_from(
        "async blocking",
        name,
        nbytes,
        {
            "memcpy into reused buffers": res["memcpy"],
            "async save: blocking per save": res["async blocking"],
        },
        "memcpy into reused buffers",
        {
            "async save: blocking per save": f"steady state; first save {first_blocking * 1e3:.0f} ms (allocates the arena)"
        },
    )
    floor = 1e-4  # a stall below 0.1 ms is noise: keep ratios finite
    rows += common.rows_from(
        "async stall",
        name,
        nbytes,
        {
            "sync save: stall per save": [max(x, floor) for x in res["sync stall"]],
            "async save: net stall per save": [max(x, floor) for x in res["async stall"]],
            "async save: background duration": res["async background"],
        },
        "sync save: stall per save",
        {"async save: net stall per save": note},
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="1 GiB state instead of 256 MiB")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(common.table(run(args.large, args.rounds)))


if __name__ == "__main__":
    main()
