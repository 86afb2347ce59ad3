"""Start-up time: ``import checkpointer`` and ``checkpointer --help``, beside their baselines.

Each is timed in fresh processes (best of N, wall clock, the interpreter's own start-up
included) beside a bare interpreter (``python -c pass``), ``import numpy`` (a floor the
core cannot go under) and ``import ml_dtypes, checkpointer`` (what ``import checkpointer``
cost while the core imported ml_dtypes eagerly), with and without a bytecode cache. Then
each package's own share from ``python -X importtime``, to show where the rest goes.

Run alone: ``python benchmarks/bench_import.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

CASES: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import numpy": [sys.executable, "-c", "import numpy"],
    "import checkpointer": [sys.executable, "-c", "import checkpointer"],
    "from checkpointer import CheckpointManager, save, load": [
        sys.executable, "-c", "from checkpointer import CheckpointManager, save, load"],
    "checkpointer --help": [sys.executable, "-m", "checkpointer", "--help"],
    # the first release imported ml_dtypes with the core: what import checkpointer cost then
    "import ml_dtypes, checkpointer (before)": [sys.executable, "-c", "import ml_dtypes, checkpointer"],
}


def child_env(cached: bool) -> dict[str, str]:
    """The children's environment: with ``cached``, bytecode written to (and read from) a
    private cache, as an installed package has it; else every module compiled each time
    (``PYTHONDONTWRITEBYTECODE`` over an editable install)."""
    env = dict(os.environ)
    if cached:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "bench-import-pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def best_of(cmd: list[str], rounds: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    """The fastest of ``rounds`` fresh runs of ``cmd`` (after one warm-up run): wall-clock
    seconds, and CPU seconds (user + system, less disturbed by other processes' load)."""
    walls, cpus = [], []
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"{cmd} exited {proc.returncode}")
        if i:  # the first run warms the caches
            walls.append(wall)
            cpus.append(usage.ru_utime + usage.ru_stime)
    return min(walls), min(cpus)


def import_shares(statement: str, env: dict[str, str], rounds: int) -> list[tuple[str, float]]:
    """Milliseconds of ``statement``'s imports per top-level package (each module's own
    time, summed; the fastest of ``rounds`` fresh processes), from ``python -X importtime``."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], check=True,
                             capture_output=True, text=True, env=env).stderr
        mine: dict[str, float] = {}
        for line in err.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
            if m:
                top = m.group(2).split(".")[0].lstrip("_") or m.group(2)
                mine[top] = mine.get(top, 0.0) + int(m.group(1)) / 1000
        for k, v in mine.items():
            best[k] = min(best.get(k, v), v)
    return sorted(best.items(), key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    for cached in (True, False):
        env = child_env(cached)
        how = "bytecode cached" if cached else "no bytecode cache: every module compiled"
        print(f"start-up, best of {args.rounds} fresh processes, {how} ({env_note})")
        print(f"  {'':<55} {'wall':>7} {'cpu':>7}")
        base = None
        for label, cmd in CASES.items():
            wall, cpu = best_of(cmd, args.rounds, env)
            base = wall if base is None else base
            print(f"  {label:<55} {wall:6.3f}s {cpu:6.3f}s  ({wall / base:4.1f}x a bare interpreter)")
    env = child_env(True)
    for statement in ("import checkpointer", "import checkpointer.cli"):
        print(f"\n{statement!r}: own import time per package (ms, best of {args.rounds}, "
              "-X importtime, bytecode cached):")
        shares = import_shares(statement, env, args.rounds)
        print("  " + ", ".join(f"{k} {v:.0f}" for k, v in shares[:14])
              + f"; all {sum(v for _, v in shares):.0f}")
    ml, _ = best_of([sys.executable, "-c", "import ml_dtypes"], args.rounds, env)
    print(f"\nimport ml_dtypes alone: {ml:.3f} s (the core imports it only when a bfloat16 or "
          "float8 dtype is looked up)")


if __name__ == "__main__":
    main()
