"""Run the benchmark suite: print one table, write it as Markdown and JSON, plot throughput.

Scenarios (one script each, runnable alone): ``bench_save`` (synchronous save),
``bench_load`` (eager load, warm and cold), ``bench_lazy`` (one tensor of a 1 GiB
checkpoint), ``bench_async`` (async saving in a training loop), ``bench_memory`` (peak
memory, a fresh subprocess per method), ``bench_verify`` (verify throughput and peak memory
beside raw reading), ``bench_preemption`` (the per-step cost of ``save_on_preemption``, 1
process and 2 gloo ranks, and the time from a signal to the committed checkpoint),
``bench_manager`` (a 1 MiB state saved 100 times through the manager) and ``bench_s3``
(64 and 256 MiB saves to a moto S3 server on 127.0.0.1 beside s3fs and boto3). Outputs
go to ``benchmarks/results/``: ``results.md``, ``results.json`` and ``throughput.png``, plus
a goals summary.

Usage: ``python benchmarks/run.py [--large] [--rounds N] [--only save load ...]``
(``make bench`` runs the default suite: 256 MiB states, a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_async  # noqa: E402
import bench_lazy  # noqa: E402
import bench_load  # noqa: E402
import bench_manager  # noqa: E402
import bench_memory  # noqa: E402
import bench_preemption  # noqa: E402
import bench_s3  # noqa: E402
import bench_save  # noqa: E402
import bench_verify  # noqa: E402
import common  # noqa: E402

SCENARIOS: dict[str, Callable[..., list[common.Row]]] = {
    "save": bench_save.run,
    "load": bench_load.run,
    "lazy": bench_lazy.run,
    "async": bench_async.run,
    "memory": bench_memory.run,
    "verify": bench_verify.run,
    "preemption": bench_preemption.run,
    "manager": bench_manager.run,
    "s3": lambda large=False, rounds=3: bench_s3.run([64, 256], rounds),
}


def _find(
    rows: list[common.Row], scenario: str, method: str, state: str | None = None
) -> common.Row | None:
    for r in rows:
        if r.scenario == scenario and r.method == method and (state is None or state in r.state):
            return r
    return None


def _times(row: common.Row | None, base: common.Row | None) -> tuple[float, float] | None:
    """``row``'s time as a multiple of ``base``'s: (best / best, median / median)."""
    if row is None or base is None:
        return None
    return row.best / base.best, row.median / base.median


def goals(rows: list[common.Row]) -> list[dict[str, Any]]:
    """Each goal (time ratios: at most the target, lower is faster) with what this run
    measured, best and median of the rounds, and whether the median meets it."""
    out: list[dict[str, Any]] = []

    def add(goal: str, pair: tuple[float, float] | None, target: float, unit: str = "x") -> None:
        if pair is not None:
            shown = " / ".join(f"{v:.2f}{unit}" if unit == "x" else f"{v:.1f} {unit}" for v in pair)
            out.append({"goal": goal, "measured": shown, "met": pair[1] <= target})

    for state in ("f32x200", "bf16+int8"):
        ck, raw = _find(rows, "save", "checkpointer", state), _find(rows, "save", "raw os.write+fsync", state)
        add(f"durable save <= 1.02x raw os.write+fsync ({state})", _times(ck, raw), 1.02)
    for state in ("f32x200", "bf16+int8"):
        ck = _find(rows, "load warm", "checkpointer", state)
        add(f"verified warm load <= 1.1x raw readinto, fresh buffer ({state})",
            _times(ck, _find(rows, "load warm", "raw readinto", state)), 1.1)  # fmt: skip
        add(f"verified warm load <= 1.5x raw readinto, preallocated ({state})",
            _times(ck, _find(rows, "load warm", "raw readinto (preallocated)", state)), 1.5)  # fmt: skip
    for scen, base in (("save", "raw os.write+fsync"), ("load warm", "raw readinto")):
        r, b = _find(rows, scen, "checkpointer", "4KiB"), _find(rows, scen, base, "4KiB")
        if r and b:
            per = ((r.best - b.best) / 10_000 * 1e6, (r.median - b.median) / 10_000 * 1e6)
            add(f"{scen.split()[0]}: <= 3 us per tensor over raw (10,000 x 4 KiB)", per, 3.0, "us")
    many = [r for r in rows if r.scenario.endswith(" saves")]
    base = next((r for r in many if r.method == bench_manager.BASELINE), None)
    add("100 manager saves of 1 MiB <= 1.5x safetensors save_file+fsync",
        _times(next((r for r in many if r.method == "CheckpointManager.save"), None), base), 1.5)  # fmt: skip
    blk = _find(rows, "async blocking", "async save: blocking per save")
    memcpy = _find(rows, "async blocking", "memcpy into reused buffers")
    add("async blocking <= 1.2x memcpy", _times(blk, memcpy), 1.2)
    for state in ("64MiB", "256MiB"):
        ck, pipe = _find(rows, "s3 save", "checkpointer.save", state), _find(rows, "s3 save", "s3fs pipe_file", state)
        add(f"S3 save <= 1.11x s3fs pipe_file, i.e. >= 0.9x its speed ({state})", _times(ck, pipe), 1 / 0.9)
    nocrc = _find(rows, "save", "checkpointer (no crc)", "f32x200")
    add("checksums add <= 10% to a durable save", _times(_find(rows, "save", "checkpointer", "f32x200"), nocrc), 1.1)
    for scen in ("lazy 1 tensor of 1GiB", "lazy 1 tensor of 1GiB (cold)"):
        r = _find(rows, scen, "checkpointer.open+tensor" + (" (cold)" if "cold" in scen else ""))
        add(f"open 1 GiB + read one small tensor < 20 ms{' (cold)' if 'cold' in scen else ''}",
            None if r is None else (r.best * 1e3, r.median * 1e3), 20, "ms")  # fmt: skip
    return out


def plot(rows: list[common.Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[common.Row]] = {}
    for r in rows:
        if r.times[0] > 0 and not r.scenario.startswith(("peak", "async", "lazy", "preemption")):
            groups.setdefault((r.scenario, r.state), []).append(r)
    fig, axes = plt.subplots(
        len(groups), 1, figsize=(10, 2.2 + 0.32 * sum(map(len, groups.values()))), squeeze=False
    )
    for ax, ((scen, state), rs) in zip(axes[:, 0], groups.items(), strict=True):
        names = [r.method for r in rs]
        colors = [
            "tab:orange"
            if n.startswith("checkpointer")
            else "tab:gray"
            if n.startswith("raw")
            else "tab:blue"
            for n in names
        ]
        ax.barh(names, [r.mbps for r in rs], color=colors)
        ax.invert_yaxis()
        ax.set_title(f"{scen}: {state}", fontsize=9)
        ax.set_xlabel("MiB/s (best of rounds)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="1 GiB states instead of 256 MiB")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="scenarios to run")
    ap.add_argument("--states", nargs="*", help="substrings of state names (save/load)")
    args = ap.parse_args()
    rows: list[common.Row] = []
    t0 = time.time()
    for name, fn in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        print(f"== {name} ...", flush=True)
        kwargs: dict[str, Any] = {"large": args.large}
        if name not in ("memory", "lazy"):
            kwargs["rounds"] = args.rounds
        if name in ("save", "load"):
            kwargs["only"] = args.states
        rows += fn(**kwargs)
        print(f"   {time.time() - t:.0f} s", flush=True)
    timed = [r for r in rows if not r.scenario.startswith("peak")]
    mem = [r for r in rows if r.scenario.startswith("peak")]
    summary = goals(rows)
    text = "\n\n".join(
        filter(
            None,
            [
                f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
                f"{args.rounds} rounds after a warm-up; total {time.time() - t0:.0f} s.",
                common.table(timed) if timed else "",
                bench_memory.table(mem) if mem else "",
                "| goal | measured (best / median) | met (median) |\n|---|---|---|\n"
                + "\n".join(
                    f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |"
                    for g in summary
                ),
            ],
        )
    )
    print(text)
    os.makedirs(common.RESULTS, exist_ok=True)
    with open(os.path.join(common.RESULTS, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(common.RESULTS, "results.json"), "w") as f:
        json.dump(
            {
                "rows": [r.as_dict() for r in rows],
                "goals": summary,
                "args": vars(args),
                "cpus": os.cpu_count(),
            },
            f,
            indent=1,
        )
    if timed:
        plot(timed, os.path.join(common.RESULTS, "throughput.png"))
    common.remove(os.path.join(common.workdir()))


if __name__ == "__main__":
    main()
