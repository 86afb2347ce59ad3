"""The replica tier: its copy to S3 against s3fs writing the same bytes, and what a copy in
the background costs the training steps.

A 256 MiB checkpoint (``--mib``; the suite's mixed float32 state) is saved on local disk. The
S3 server is moto on 127.0.0.1 in a process of its own (``--server-nice N`` runs it niced,
standing in for a server on another machine).

1. Copy: timed, side by side, rounds alternating: ``copy_checkpoint`` of it to ``s3://``
   in this process (streamed through one 8 MiB buffer, every tensor's crc32c checked on the
   way, committed with the manifest last), the same copy through the replica tier's child
   process (``replica_process.CopyProcess``, as the tier ships: started in the warm-up round
   and kept, as the tier keeps it), and the baseline, s3fs ``pipe_file`` of each of its files
   (read from disk in the timed region too). Reported: best and median of the rounds, and
   the ratio pipe / copy (1.0 = as fast as s3fs alone).
2. Steps: a training-like step (``--layers`` float32 ``--n`` x ``--n`` matmuls, each
   followed by tanh: ~2.7 ms), BLAS on one thread (``OPENBLAS_NUM_THREADS``, default 1: the
   loop on one core, the other left to the copy and the server) timed one by one, in phases:
   nothing in the background (for as long as a copy lasts); a
   ``CheckpointManager(replica="s3://...")`` copying the checkpoint it just saved (steps from
   the save's return until the replica tier is no longer ``busy``; the save itself is not a
   step), as shipped (the copy in a niced child process), and with the copy in the tier's
   thread (``replica_process.MODE = "never"``: what the first design did). A copy that fails
   voids the run. Rounds interleave the phases, order alternating. Reported per phase: the
   mean (lost throughput), median and p90 step time, best and median of the rounds, and the
   slowdown against the phase with nothing in the background.

    python benchmarks/bench_replica.py [--mib 256] [--rounds 3] [--steps-rounds 3] [--server-nice 0]

Default run: about 2 minutes on 2 cores.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer import CheckpointManager, replica_process  # noqa: E402
from checkpointer.replica import copy_checkpoint  # noqa: E402
from checkpointer.replica_process import CopyProcess  # noqa: E402
from checkpointer.storage import open_store  # noqa: E402

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SERVER = ("import sys\nfrom moto.server import ThreadedMotoServer\n"
          "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\n"
          "s.start()\nprint('up', flush=True)\nsys.stdin.read()\ns.stop()\n")
NO_COPY, SHIPPED, THREAD = "no replication", "replica copying (child process, as shipped)", "replica copying in its thread"
PHASES = [NO_COPY, SHIPPED, THREAD]
MODES = {SHIPPED: "auto", THREAD: "never"}  # replica_process.MODE in each phase
CHILD_COPY = "replica tier's copy process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(nice: int = 0) -> Iterator[dict[str, Any]]:
    """A moto S3 server with a bucket ``bench``; the s3fs options that reach it."""
    os.environ.update(AWS_ENV)
    import boto3

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, **AWS_ENV), preexec_fn=(lambda: os.nice(nice)) if nice else None)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        yield {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"}
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(mib: int, rounds: int, opts: dict[str, Any]) -> list[common.Row]:
    """The copy against s3fs ``pipe_file``, through the server ``opts`` reaches."""
    with tempfile.TemporaryDirectory(dir=common.workdir()) as tmp:
        checkpointer.save(os.path.join(tmp, "ckpt"), common.mixed_state(mib * common.MiB))
        src = open_store(tmp)
        folder = os.path.join(tmp, "ckpt")
        dst = open_store("s3://bench/copy", opts)
        fs = getattr(dst, "fs")  # noqa: B009 - the s3fs filesystem under the store

        child = CopyProcess({"source": [tmp, None], "dest": ["s3://bench/child", opts]})

        def copy() -> None:
            copy_checkpoint(src, "ckpt", dst)

        def copy_in_child() -> None:
            child.copy("ckpt")

        def pipe() -> None:
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as f:
                    fs.pipe_file(f"bench/pipe/ckpt/{name}", f.read())

        def clean(_: str) -> None:  # moto keeps objects in memory: one copy at a time
            for prefix in ("bench/copy", "bench/pipe", "bench/child"):
                if fs.exists(prefix):
                    fs.rm(prefix, recursive=True)
            fs.invalidate_cache()

        nbytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
        times = common.bench({"s3fs pipe_file": pipe, "checkpointer copy_checkpoint": copy,
                              CHILD_COPY: copy_in_child}, rounds=rounds, setup=clean)
        child.close()
        clean("")
        notes = {"s3fs pipe_file": "each file read, then one pipe_file (no checksums)",
                 "checkpointer copy_checkpoint": "in this process: streamed, crc32c checked, manifest last",
                 CHILD_COPY: "the same in the replica tier's child process (started in the warm-up)"}
        return common.rows_from("replica", f"f32x200-{mib}MiB", nbytes, times, "s3fs pipe_file", notes)


# -- training steps during a copy ---------------------------------------------------------

def _train_step(n: int, layers: int) -> Callable[[], None]:
    """The training step: ``layers`` matmuls and tanh (each releases the GIL, as a real step's ops do)."""
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((n, n), dtype=np.float32) / np.sqrt(n) for _ in range(layers)]
    x = rng.standard_normal((n, n), dtype=np.float32)

    def step() -> None:
        h = x
        for w in weights:
            h = np.tanh(h @ w)

    return step


def _steps(step: Callable[[], None], going: Callable[[], bool]) -> list[float]:
    """Time ``step`` one call at a time while ``going()`` (asked before each step)."""
    out = []
    while going():
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def _manager(tmp: str, name: str, opts: dict[str, Any]) -> CheckpointManager:
    return CheckpointManager(os.path.join(tmp, name), every_n_epochs=None, keep_last=1,
                             replica=f"s3://bench/{name}", replica_storage_options=opts, replica_keep_last=1)


def _copying(mgr: CheckpointManager, state: dict[str, np.ndarray], step: Callable[[], None],
             seq: int) -> list[float]:
    """Steps while ``mgr``'s replica copies the checkpoint it just saved (the save untimed)."""
    rep = getattr(mgr, "_tiers").replica  # noqa: B009 - the manager's replica tier
    info = mgr.save(state, step=seq)
    times = _steps(step, lambda: bool(rep.busy))
    mgr.wait()
    if not any(s.info.name == info.name for s in rep.entries):
        raise RuntimeError(f"the replica copy of {info.name} failed: the timings are void")
    return times


def _stats(times: list[float]) -> tuple[float, float, float]:
    return statistics.fmean(times), statistics.median(times), float(np.percentile(times, 90))


def _phase(phase: str, mgrs: dict[str, CheckpointManager], state: dict[str, np.ndarray],
           step: Callable[[], None], seq: int, window: float) -> list[float]:
    """One phase's step times: ``window`` seconds of steps alone, or steps during a copy."""
    if phase == NO_COPY:
        end = time.perf_counter() + window
        return _steps(step, lambda: time.perf_counter() < end)
    replica_process.MODE = MODES[phase]  # read when the copy starts, right after the save
    return _copying(mgrs[phase], state, step, seq)


def run_steps(mib: int, rounds: int, opts: dict[str, Any], n: int, layers: int) -> dict[str, Any]:
    """Each phase's (mean, median, p90) step time per round; the phases' seconds; the step."""
    state = common.mixed_state(mib * common.MiB)
    step = _train_step(n, layers)
    per: dict[str, list[tuple[float, float, float]]] = {p: [] for p in PHASES}
    took: dict[str, list[float]] = {p: [] for p in PHASES}
    with tempfile.TemporaryDirectory(dir=common.workdir()) as tmp:
        mgrs = {SHIPPED: _manager(tmp, "shipped", opts), THREAD: _manager(tmp, "thread", opts)}
        t = time.perf_counter()
        for phase, m in mgrs.items():  # warm-up (the child, connections, first allocations): untimed
            replica_process.MODE = MODES[phase]
            _copying(m, state, step, 0)
        window = (time.perf_counter() - t) / 2
        for r in range(rounds):
            for phase in PHASES if r % 2 == 0 else PHASES[::-1]:
                t = time.perf_counter()
                per[phase].append(_stats(_phase(phase, mgrs, state, step, r + 1, window)))
                took[phase].append(time.perf_counter() - t)
        for m in mgrs.values():
            m.close()
    return {"per": per, "took": took, "step": f"{layers} x (matmul {n}x{n} float32, tanh)"}


def _report(res: dict[str, Any]) -> str:
    per, took = res["per"], res["took"]
    base = [statistics.median(x[i] for x in per[NO_COPY]) for i in range(3)]
    best_base = [min(x[i] for x in per[NO_COPY]) for i in range(3)]
    lines = [f"\nsteps: {res['step']}, BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}; ms per step, "
             "best / median of the rounds; slowdown: median vs median (best vs best)",
             "| phase | seconds | mean ms | median ms | p90 ms | slowdown mean | slowdown median | slowdown p90 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, rows in per.items():
        cells, slow = [], []
        for i in range(3):
            vals = [x[i] for x in rows]
            cells.append(f"{min(vals) * 1e3:.2f} / {statistics.median(vals) * 1e3:.2f}")
            slow.append(f"{statistics.median(vals) / base[i] - 1:+.0%} ({min(vals) / best_base[i] - 1:+.0%})")
        lines.append(f"| {phase} | {statistics.median(took[phase]):.1f} | {' | '.join(cells)} | {' | '.join(slow)} |")
    return "\n".join(lines)


def _step_rows(res: dict[str, Any], mib: int) -> list[common.Row]:
    """The phases as rows for the JSON: ``times`` the rounds' mean step times."""
    times = {p: [x[0] for x in rows] for p, rows in res["per"].items()}
    rows = common.rows_from("replica steps", f"f32x200-{mib}MiB", 0, times, NO_COPY)
    for r in rows:
        r.note = res["step"]
        r.extra = {"median_s": [x[1] for x in res["per"][r.method]], "p90_s": [x[2] for x in res["per"][r.method]],
                   "phase_s": res["took"][r.method]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the copy against s3fs")
    parser.add_argument("--steps-rounds", type=int, default=3, help="rounds of the step timing (0: none)")
    parser.add_argument("--n", type=int, default=256, help="the step's matrix size")
    parser.add_argument("--layers", type=int, default=3, help="matmuls per step")
    parser.add_argument("--server-nice", type=int, default=0, help="niceness of the moto server")
    args = parser.parse_args()
    started = time.perf_counter()
    with _server(args.server_nice) as opts:
        rows = run(args.mib, args.rounds, opts) if args.rounds else []
        steps = run_steps(args.mib, args.steps_rounds, opts, args.n, args.layers) if args.steps_rounds else None
    if rows:
        print(common.table(rows))
        copy = next(r for r in rows if r.method.startswith("checkpointer"))
        print(f"\ncopy / s3fs pipe_file: {copy.ratio_best:.2f}x best, {copy.ratio_median:.2f}x median "
              f"(goal >= 0.90x)")
    if steps is not None:
        print(_report(steps) + "\n(goal: slowdown <= +10%)")
        rows += _step_rows(steps, args.mib)
    if rows:
        common.dump(rows, "replica")
    print(f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
