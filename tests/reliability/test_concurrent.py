"""Concurrent writers: two processes saving into one directory at the same time.

Same names (both replace one checkpoint) and different names, on local disk; different
names on S3. Each save either commits or fails with a clear ``CheckpointError``; afterwards
a fresh manager lists only checkpoints that verify and hold exactly what one writer saved,
and no leftover of the engine remains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _checks import engine_leftovers, multipart_leftovers
from _relcommon import AWS_ENV, HERE, s3_options

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.storage import open_store

COUNT = 25


def run_writers(
    directory: str, filenames: list[str | None], opts: dict[str, Any] | None
) -> list[dict[str, Any]]:
    start = time.time() + (2.5 if opts else 0.8)  # after both have imported and opened
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_writer.py"),
                json.dumps(
                    {
                        "directory": directory,
                        "writer": w + 1,
                        "filename": fn,
                        "count": COUNT,
                        "start": start,
                        "storage_options": opts,
                    }
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **AWS_ENV),
        )
        for w, fn in enumerate(filenames)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"a writer crashed with a non-CheckpointError: {stderr[-3000:]}"
        out.append(json.loads(stdout.splitlines()[-1]))
    return out


def check(directory: str, opts: dict[str, Any] | None) -> list[str]:
    kw = {"storage_options": opts} if opts else {}
    with CheckpointManager(directory, **kw) as mgr:
        names = [i.name for i in mgr.checkpoints]
        for info in mgr.checkpoints:
            state = checkpointer.load(info.url, **kw)
            assert (state["w"] == state["writer"] * 1000 + state["step"]).all(), info.name
            assert info.step == state["step"] and info.epoch == state["writer"], info.name
    store = open_store(directory, opts)
    assert not engine_leftovers(store, names) + multipart_leftovers(store)
    return names


@pytest.mark.parametrize("names", ["same", "different"])
def test_two_local_writers(tmp_path: Path, names: str, trials: Counter[str]) -> None:
    d = str(tmp_path / "shared")
    filenames = ["slot", "slot"] if names == "same" else ["a-{step}", "b-{step}"]
    results = run_writers(d, filenames, None)
    listed = check(d, None)
    oks = sum(r["ok"] for r in results)
    if names == "same":
        assert listed == ["slot"]
    else:
        assert len(listed) == oks == 2 * COUNT
    assert oks >= COUNT, f"too many failed saves: {results}"
    trials[f"concurrent saves committed (local, {names} names)"] += oks
    trials[f"concurrent saves refused with a CheckpointError (local, {names} names)"] += sum(
        len(r["errors"]) for r in results
    )


def test_two_s3_writers(s3_dir: str, s3_endpoint: str, trials: Counter[str]) -> None:
    opts = s3_options(s3_endpoint)
    results = run_writers(s3_dir, ["a-{step}", "b-{step}"], opts)
    assert len(check(s3_dir, opts)) == sum(r["ok"] for r in results) == 2 * COUNT
    trials["concurrent saves committed (s3, different names)"] += 2 * COUNT


def test_replacing_a_name_spares_a_live_writers_objects() -> None:
    """On an object store, a save replacing ``slot`` deletes the data the replaced manifest
    named, never the data objects of another live writer of ``slot`` (its manifest may
    still come and name them)."""
    import uuid

    import numpy as np

    from checkpointer.owners import HOST as _HOST

    url = f"memory://concurrent-{uuid.uuid4().hex[:8]}"
    store = open_store(url)
    with CheckpointManager(url, filename="slot") as mgr:
        mgr.save({"w": np.zeros(3)}, step=0)
        first = {p for p in store.list_files() if p.startswith("slot/data-")}
        live = f"slot/data-{_HOST}.{os.getppid()}.0badf00d-00000.safetensors"
        store.put_bytes(live, b"in flight")
        mgr.save({"w": np.ones(3)}, step=1)
    left = {p for p in store.list_files() if p.startswith("slot/data-")}
    assert live in left and not first & left
    assert (checkpointer.load(f"{url}/slot")["w"] == 1).all()
