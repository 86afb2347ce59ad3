"""The replica tier's copy to S3 against s3fs writing the same bytes.

A 256 MiB checkpoint (``--mib``; the suite's mixed float32 state) is saved on local disk
once. Timed, side by side, rounds alternating: ``copy_checkpoint`` of it to ``s3://``
(streamed through one 8 MiB buffer, every tensor's crc32c checked on the way, committed
with the manifest last: what the replica tier does per checkpoint), and the baseline,
s3fs ``pipe_file`` of each of its files (read from disk in the timed region too) to
``s3://``. The S3 server is moto on 127.0.0.1 in a process of its own. Reported: best and
median of the rounds, and the ratio pipe / copy (1.0 = as fast as s3fs alone).

    python benchmarks/bench_replica.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.replica import copy_checkpoint  # noqa: E402
from checkpointer.storage import open_store  # noqa: E402

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SERVER = ("import sys\nfrom moto.server import ThreadedMotoServer\n"
          "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\n"
          "s.start()\nprint('up', flush=True)\nsys.stdin.read()\ns.stop()\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server() -> tuple[subprocess.Popen[str], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, **AWS_ENV))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    return proc, f"http://127.0.0.1:{port}"


def run(mib: int, rounds: int) -> list[common.Row]:
    os.environ.update(AWS_ENV)
    import boto3

    proc, endpoint = _server()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        opts: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing",
                                "secret": "testing"}
        with tempfile.TemporaryDirectory(dir=common.workdir()) as tmp:
            checkpointer.save(os.path.join(tmp, "ckpt"), common.mixed_state(mib * common.MiB))
            src = open_store(tmp)
            folder = os.path.join(tmp, "ckpt")
            dst = open_store("s3://bench/copy", opts)
            fs = getattr(dst, "fs")  # noqa: B009 - the s3fs filesystem under the store

            def copy() -> None:
                copy_checkpoint(src, "ckpt", dst)

            def pipe() -> None:
                for name in sorted(os.listdir(folder)):
                    with open(os.path.join(folder, name), "rb") as f:
                        fs.pipe_file(f"bench/pipe/ckpt/{name}", f.read())

            def clean(_: str) -> None:  # moto keeps objects in memory: one copy at a time
                for prefix in ("bench/copy", "bench/pipe"):
                    if fs.exists(prefix):
                        fs.rm(prefix, recursive=True)
                fs.invalidate_cache()

            nbytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
            times = common.bench({"s3fs pipe_file": pipe, "checkpointer copy_checkpoint": copy},
                                 rounds=rounds, setup=clean)
            notes = {"s3fs pipe_file": "each file read, then one pipe_file (no checksums)",
                     "checkpointer copy_checkpoint": "streamed, crc32c checked, manifest last"}
            return common.rows_from("replica", f"f32x200-{mib}MiB", nbytes, times, "s3fs pipe_file", notes)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.mib, args.rounds)
    print(common.table(rows))
    copy = next(r for r in rows if r.method.startswith("checkpointer"))
    print(f"\ncopy / s3fs pipe_file: {copy.ratio_best:.2f}x best, {copy.ratio_median:.2f}x median "
          f"(goal >= 0.90x); {time.perf_counter() - started:.0f} s in all")
    common.dump(rows, "replica")


if __name__ == "__main__":
    main()
