"""Run the benchmark suite: print one table, write it as Markdown and JSON, plot throughput.

Scenarios (one script each, runnable alone): ``bench_save`` (synchronous save),
``bench_load`` (eager load, warm and cold), ``bench_lazy`` (one tensor of a 1 GiB
checkpoint), ``bench_async`` (async saving in a training loop), ``bench_memory`` (peak
memory, a fresh subprocess per method), ``bench_verify`` (verify throughput and peak memory
beside raw reading), ``bench_preemption`` (the per-step cost of ``save_on_preemption``, 1
process and 2 gloo ranks, and the time from a signal to the committed checkpoint). Outputs
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
import bench_memory  # noqa: E402
import bench_preemption  # noqa: E402
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
}


def _find(
    rows: list[common.Row], scenario: str, method: str, state: str | None = None
) -> common.Row | None:
    for r in rows:
        if r.scenario == scenario and r.method == method and (state is None or state in r.state):
            return r
    return None


def goals(rows: list[common.Row]) -> list[dict[str, Any]]:
    """Each goal of the issue with the measured value (best-of-rounds) and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(
        goal: str, value: float | None, target: float, higher_is_better: bool, fmt: str
    ) -> None:
        if value is None:
            return
        met = value >= target if higher_is_better else value <= target
        out.append({"goal": goal, "measured": fmt.format(value), "met": met})

    big = "f32x200"
    ck = _find(rows, "save", "checkpointer", big)
    add(
        "durable sync save >= 0.90x raw os.write+fsync", ck and ck.ratio_best, 0.90, True, "{:.2f}x"
    )
    for base in ("torch.save", "np.savez", "safetensors save_file"):
        b = _find(rows, "save", base, big)
        add(
            f"sync save faster than {base} (no fsync)",
            ck and b and b.best / ck.best,
            1.0,
            True,
            "{:.2f}x",
        )
        b = _find(rows, "save", base + "+fsync", big)
        add(
            f"sync save faster than {base}+fsync",
            ck and b and b.best / ck.best,
            1.0,
            True,
            "{:.2f}x",
        )
    nocrc = _find(rows, "save", "checkpointer (no crc)", big)
    add(
        "checksums add <= 10% to a durable save",
        ck and nocrc and ck.best / nocrc.best - 1,
        0.10,
        False,
        "{:+.1%}",
    )
    mem = _find(rows, "peak memory: save", "checkpointer")
    if mem:
        goal = mem.extra["goal_bytes"]
        add(
            f"peak extra memory of a sync save <= {goal / common.MiB:.0f} MiB",
            mem.extra["extra_bytes"] / common.MiB,
            goal / common.MiB,
            False,
            "{:.1f} MiB",
        )
    blk = _find(rows, "async blocking", "async save: blocking per save")
    add("async blocking <= 1.5x memcpy", blk and 1 / blk.ratio_best, 1.5, False, "{:.2f}x memcpy")
    stall = _find(rows, "async stall", "async save: net stall per save")
    add(
        "async net stall <= 1.0x sync save",
        stall and 1 / stall.ratio_best,
        1.0,
        False,
        "{:.2f}x sync",
    )
    for scen, base in (("load warm", ""), ("load cold", " (cold)")):
        r = _find(rows, scen, "checkpointer" + base, big)
        add(
            f"eager verified load >= 0.85x raw readinto ({scen.split()[1]})",
            r and r.ratio_best,
            0.85,
            True,
            "{:.2f}x",
        )
    for scen in ("lazy 1 tensor of 1GiB", "lazy 1 tensor of 1GiB (cold)"):
        method = "checkpointer.open+tensor" + (" (cold)" if "cold" in scen else "")
        r = _find(rows, scen, method)
        add(
            f"open 1 GiB checkpoint + read one small tensor < 20 ms{' (cold)' if 'cold' in scen else ''}",
            r and r.best * 1e3,
            20,
            False,
            "{:.1f} ms",
        )
    for scen, base in (("save", "raw os.write+fsync"), ("load warm", "raw readinto")):
        r, b = _find(rows, scen, "checkpointer", "4KiB"), _find(rows, scen, base, "4KiB")
        per = r and b and (r.best - b.best) / 10_000 * 1e6
        add(
            f"per-tensor overhead of {scen.split()[0]} <= 10 us (10,000 x 4 KiB, vs raw)",
            per,
            10,
            False,
            "{:.1f} us",
        )
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
                "| goal | measured (best of rounds) | met |\n|---|---|---|\n"
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
