"""Shared pieces of the benchmark scripts: states, timing, baselines' helpers, tables.

Every scenario times the project beside its baselines in one process, in an order that
alternates from round to round (forward, then reversed), after one warm-up round, and
reports the best and the median of the timed rounds. Ratios are speed ratios against the
scenario's raw baseline: ``baseline_time / method_time`` (above 1 means faster than raw).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

MiB = 1 << 20
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# -- states ------------------------------------------------------------------------------


def mixed_state(total: int, n: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` float32 tensors summing to ``total`` bytes: four large ones hold ~94%, the rest small."""
    rng = np.random.default_rng(seed)
    n_small = n - 4
    small = max(1024, (total * 6 // 100) // n_small // 4)  # elements per small tensor
    large = (total // 4 - small * n_small) // 4 // 256 * 256
    out = {
        f"layer{i}/weight": rng.standard_normal(large, dtype=np.float32).reshape(-1, 256)
        for i in range(4)
    }
    for i in range(n_small):
        out[f"small{i:03d}/bias"] = rng.standard_normal(small, dtype=np.float32)
    return out


def bf16_int8_state(total: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Half the bytes bfloat16 weights, half int8 (quantized) tensors, 64 tensors each."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    per = total // 2 // 64
    for i in range(64):
        out[f"bf16/{i:02d}"] = rng.standard_normal(per // 2, dtype=np.float32).astype(
            ml_dtypes.bfloat16
        )
        out[f"int8/{i:02d}"] = rng.integers(-128, 128, per, dtype=np.int8)
    return out


def small_state(n: int = 10_000, nbytes: int = 4096, seed: int = 2) -> dict[str, np.ndarray]:
    """``n`` float32 tensors of ``nbytes`` bytes each (default 10,000 x 4 KiB)."""
    rng = np.random.default_rng(seed)
    return {f"t{i:05d}": rng.standard_normal(nbytes // 4, dtype=np.float32) for i in range(n)}


def states(large: bool, only: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The benchmark states by name; 256 MiB by default, 1 GiB with ``large``."""
    size = (1024 if large else 256) * MiB
    makers: dict[str, Callable[[], dict[str, np.ndarray]]] = {
        f"f32x200-{size // MiB}MiB": lambda: mixed_state(size),
        f"bf16+int8-{size // MiB}MiB": lambda: bf16_int8_state(size),
        "4KiBx10000": small_state,
    }
    return {k: f() for k, f in makers.items() if not only or any(o in k for o in only)}


def nbytes_of(state: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in state.values())


# -- files -------------------------------------------------------------------------------


def workdir() -> str:
    """A scratch folder on the same disk as the project (``BENCH_DIR`` overrides)."""
    path = os.environ.get("BENCH_DIR") or os.path.join(RESULTS, "..", ".scratch")
    os.makedirs(path, exist_ok=True)
    return os.path.abspath(path)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Evict ``path`` (a file or every file of a folder) from the page cache."""
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: str, arrays: Sequence[np.ndarray], durable: bool) -> None:
    """The raw baseline: ``os.write`` of every array's bytes into one file (``fsync`` if durable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for a in arrays:
            view = memoryview(a.reshape(-1).view(np.uint8))
            while view:
                view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def raw_readinto(path: str, buf: np.ndarray | None = None) -> np.ndarray:
    """The raw read baseline: one ``readinto`` loop into a fresh buffer the file's size
    (or into ``buf``, allocated and touched beforehand: the preallocated baseline)."""
    size = os.path.getsize(path)
    buf = np.empty(size, dtype=np.uint8) if buf is None else buf[:size]
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < size:
            n = f.readinto(view[got : got + (64 * MiB)])
            if not n:
                raise OSError("short read")
            got += n
    return buf


# -- timing ------------------------------------------------------------------------------


@dataclass
class Row:
    """One method's timings in one scenario; ``ratio_*`` are speed ratios to ``baseline``."""

    scenario: str
    state: str
    method: str
    nbytes: int
    times: list[float]
    baseline: str = ""
    ratio_best: float = float("nan")
    ratio_median: float = float("nan")
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def mbps(self) -> float:
        return self.nbytes / MiB / self.best if self.best > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(best_s=self.best, median_s=self.median, best_MiBps=self.mbps)
        return d


Method = Callable[[], Any]
Setup = Callable[[str], None]


def bench(
    methods: dict[str, Method], *, rounds: int, warmup: int = 1, setup: Setup | None = None
) -> dict[str, list[float]]:
    """Time each method ``rounds`` times, alternating the order; ``setup(name)`` is untimed."""
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            if setup is not None:
                setup(name)
            gc.collect()
            t0 = time.perf_counter()
            methods[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def rows_from(
    scenario: str,
    state: str,
    nbytes: int,
    times: dict[str, list[float]],
    baseline: str,
    notes: dict[str, str] | None = None,
) -> list[Row]:
    """Rows with speed ratios against ``baseline`` (best vs best, median vs median)."""
    base = times[baseline]
    out = []
    for name, ts in times.items():
        row = Row(scenario, state, name, nbytes, ts, baseline, note=(notes or {}).get(name, ""))
        row.ratio_best = min(base) / min(ts)
        row.ratio_median = statistics.median(base) / statistics.median(ts)
        out.append(row)
    return out


# -- output ------------------------------------------------------------------------------


def table(rows: Sequence[Row]) -> str:
    """A Markdown table of ``rows``."""
    lines = [
        "| scenario | state | method | best ms | median ms | MiB/s | x baseline (best / median) | baseline | note |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.state} | {r.method} | {r.best * 1e3:.1f} | {r.median * 1e3:.1f} "
            f"| {r.mbps:.0f} | {r.ratio_best:.2f} / {r.ratio_median:.2f} | {r.baseline} | {r.note} |"
        )
    return "\n".join(lines)


def dump(rows: Sequence[Row], stem: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump([r.as_dict() for r in rows], f, indent=1)
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write(table(rows) + "\n")


def state_scenario_main(doc: str | None, run: Callable[[bool, int, Sequence[str] | None], list[Row]]) -> None:
    """Command line of a scenario over the benchmark states (``--large --rounds --states``)."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--large", action="store_true", help="1 GiB states instead of 256 MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--states", nargs="*", help="substrings of state names to run")
    args = ap.parse_args()
    print(table(run(args.large, args.rounds, args.states)))
