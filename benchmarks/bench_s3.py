"""Saving to ``s3://`` beside s3fs ``pipe_file`` and boto3 ``upload_fileobj`` of the same bytes.

The S3 server is moto on 127.0.0.1 in a process of its own (as in ``bench_replica``). The
state is the suite's mixed float32 one at ``--mib`` sizes (64 and 256 MiB by default):

- ``checkpointer.save`` to ``s3://`` (one data file, its crc32c computed, then the manifest:
  a single PUT below 100 MiB, 16 MiB parts 4 at a time above, ``checkpointer.s3_upload``);
- s3fs ``pipe_file`` of the tensors' bytes joined beforehand (one PUT below 100 MiB, 50 MiB
  parts up to 10 at a time above; the join is not timed);
- boto3 ``upload_fileobj`` of the same bytes from memory (its transfer manager: 8 MiB parts,
  10 threads, above its 8 MiB threshold).

Rounds alternate the order; each method writes to a clean prefix (untimed). Reported: best
and median, and each method's ratio to ``pipe_file`` (above 1.0 = faster than s3fs).

    python benchmarks/bench_s3.py [--mib 64 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_replica  # noqa: E402
import common  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.storage import open_store  # noqa: E402

PIPE = "s3fs pipe_file"


def run(mibs: list[int], rounds: int) -> list[common.Row]:
    import boto3

    rows: list[common.Row] = []
    with bench_replica._server() as opts:
        fs = getattr(open_store("s3://bench/x", opts), "fs")  # noqa: B009 - the s3fs filesystem
        client = boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"],
                              aws_access_key_id=opts["key"], aws_secret_access_key=opts["secret"],
                              region_name="us-east-1")
        for mib in mibs:
            rows += _one(mib, rounds, fs, client, opts)
    return rows


def _one(mib: int, rounds: int, fs: Any, client: Any, opts: dict[str, Any]) -> list[common.Row]:
    state = common.mixed_state(mib * common.MiB)
    data = b"".join(a.tobytes() for a in state.values())

    def clean(_: str) -> None:
        for prefix in ("bench/ck", "bench/pipe", "bench/boto"):
            if fs.exists(prefix):
                fs.rm(prefix, recursive=True)
        fs.invalidate_cache()

    methods = {
        PIPE: lambda: fs.pipe_file("bench/pipe/data", data),
        "boto3 upload_fileobj": lambda: client.upload_fileobj(io.BytesIO(data), "bench", "boto/data"),
        "checkpointer.save": lambda: checkpointer.save("s3://bench/ck", state, storage_options=opts),
    }
    times = common.bench(methods, rounds=rounds, setup=clean)
    clean("")
    notes = {PIPE: "bytes joined beforehand (untimed)", "boto3 upload_fileobj": "from memory",
             "checkpointer.save": "crc32c, manifest last; one PUT < 100 MiB, parallel parts above"}
    return common.rows_from("s3 save", f"f32x200-{mib}MiB", common.nbytes_of(state), times, PIPE, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = run(args.mib, args.rounds)
    print(common.table(rows))
    for r in rows:
        if r.method == "checkpointer.save":
            print(f"{r.state}: checkpointer.save vs s3fs pipe_file {r.ratio_best:.2f}x best, "
                  f"{r.ratio_median:.2f}x median (goal >= 0.90x)")
    common.dump(rows, "s3")


if __name__ == "__main__":
    main()
