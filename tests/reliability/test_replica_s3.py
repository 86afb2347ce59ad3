"""The replica tier on ``s3://`` for real: s3fs and a moto server on 127.0.0.1.

A local directory replicated to S3 end to end (sync and async), the replica listed by
``checkpointer ls`` and by a manager opened on it alone, a new machine resuming from it;
an unreachable replica (a closed loopback port) that never fails a save; and a child
process SIGKILLed in the middle of a replication: the replica then lists only whole
checkpoints, and the next run cleans up and catches up.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _checks import check_directory
from _relcommon import AWS_ENV, _child_env, s3_options

import checkpointer
from checkpointer import CheckpointManager, StorageError, replica_process
from checkpointer.cli import main as cli_main
from checkpointer.plan import CheckpointWarning


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(2000, step, np.float32), "step": step}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_local_run_replicated_to_s3_and_resumed_on_a_new_machine(
        tmp_path: Path, s3_dir: str, s3_endpoint: str, async_save: bool, capsys: Any,
        trials: Counter[str]) -> None:
    opts = s3_options(s3_endpoint)
    local = tmp_path / "local"
    kw: dict[str, Any] = {"monitor": "loss", "keep_last": 1, "replica": s3_dir, "replica_keep_last": 3,
                          "replica_storage_options": opts, "async_save": async_save}
    losses = [0.4, 0.2, 0.5, 0.6, 0.7]
    with CheckpointManager(local, **kw) as mgr:
        for step, loss in enumerate(losses, start=1):
            mgr.save(state(step), step=step, metrics={"loss": loss})
            mgr.wait()  # each copy in turn (otherwise the newest waiting one wins)
        assert [c.step for c in mgr.checkpoints] == [2, 3, 4, 5]  # the best (2) and the last 3
        # the best and the newest are in both tiers: read locally; 3 and 4 from the replica
        assert [c.url.startswith("s3://") for c in mgr.checkpoints] == [False, True, True, False]
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == [
        "step-000000002", "step-000000005"]
    assert cli_main(["ls", s3_dir, "-o", f"client_kwargs.endpoint_url={s3_endpoint}",
                     "-o", "key=testing", "-o", "secret=testing"]) == 0
    listed = capsys.readouterr().out
    assert all(f"step-00000000{s}" in listed for s in (2, 3, 4, 5)) and "step-000000001" not in listed
    check_directory(s3_dir, {"storage_options": opts, "monitor": "loss"})  # whole, verified, no leftovers

    shutil.rmtree(local)  # a new machine: the local directory is empty
    with CheckpointManager(local, **kw) as mgr:
        got = mgr.restore()
        assert got.info.url == f"{s3_dir}/step-000000005" and got.state["step"] == 5
        assert mgr.restore("best").state["step"] == 2
        info = mgr.save(state(6), step=6, metrics={"loss": 0.1})
        assert info.url == str(local / "step-000000006")
    with CheckpointManager(s3_dir, storage_options=opts, monitor="loss") as there:
        # the last 3, and 2: this run restored it ("restored from" is never deleted)
        assert [c.step for c in there.checkpoints] == [2, 4, 5, 6] and there.best.step == 6
    state6 = checkpointer.load(f"{s3_dir}/step-000000006", storage_options=opts)
    assert state6["step"] == 6 and (state6["w"] == 6).all()
    trials["s3 replica runs"] += 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_replica_never_fails_a_save(tmp_path: Path) -> None:
    dead = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}"}, "key": "testing",
            "secret": "testing", "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2}}
    started = time.monotonic()
    with pytest.warns(CheckpointWarning, match="Could not connect") as warned:
        mgr = CheckpointManager(tmp_path / "local", keep_last=1, replica="s3://rel/down",
                                replica_storage_options=dead)
        for step in (1, 2, 3):
            assert mgr.save(state(step), step=step).step == step
            mgr.wait()
        assert [c.step for c in mgr.checkpoints] == [3]  # the local tier only, retained as usual
        with pytest.raises(StorageError, match="step-000000003 never reached the replica s3://rel/down"):
            mgr.close()
    assert time.monotonic() - started < 60  # generous: fast-fail options, nothing hangs
    assert sum("replication of" in str(w.message) for w in warned) == 4  # one per save, one at close
    assert checkpointer.load(tmp_path / "local" / "step-000000003")["step"] == 3


CHILD = r"""
import json, sys
import numpy as np
from checkpointer import CheckpointManager
local, replica, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
mgr = CheckpointManager(local, keep_last=1, replica=replica, replica_storage_options=opts,
                        max_file_bytes=1 << 14)
for step in range(1, 10_000):
    # 32 arrays of 16 KiB, one data file each: a copy is 32 object writes
    mgr.save({"layers": [np.full(4096, step, np.float32) for _ in range(32)]}, step=step)
"""


def _partial_copy(client: Any, prefix: str) -> str | None:
    """A checkpoint folder in the replica holding at most a quarter of its data objects and no
    manifest: a copy under way, far from its commit."""
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="rel", Prefix=prefix + "/").get("Contents", [])]
    folders: dict[str, list[str]] = {}
    for key in keys:
        rel = key[len(prefix) + 1:]
        if "/" in rel:
            folder, base = rel.split("/", 1)
            folders.setdefault(folder, []).append(base)
    for folder, bases in folders.items():
        data = [b for b in bases if b.startswith("data-")]
        if "manifest.msgpack" not in bases and 0 < len(data) <= 8:
            return folder
    return None


def test_copies_to_s3_run_in_a_child_process(tmp_path: Path, s3_dir: str, s3_endpoint: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def in_this_process(*_: Any) -> None:
        raise AssertionError("copied in the training process")

    monkeypatch.setattr(replica_process, "copy_with_manifest", in_this_process)  # the child has the real one
    opts = s3_options(s3_endpoint)
    with CheckpointManager(tmp_path / "local", replica=s3_dir, replica_storage_options=opts) as mgr:
        mgr.save(state(1), step=1)
    with CheckpointManager(s3_dir, storage_options=opts) as there:
        assert [c.step for c in there.checkpoints] == [1]
        assert (there.restore().state["w"] == 1).all()


def test_a_kill_during_replication_leaves_whole_checkpoints_and_the_next_run_catches_up(
        tmp_path: Path, s3_dir: str, s3_endpoint: str, trials: Counter[str]) -> None:
    import boto3

    opts = s3_options(s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = s3_dir.split("/", 3)[3]
    local = tmp_path / "local"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(local), s3_dir, json.dumps(opts)],
                             stdout=subprocess.DEVNULL, env=_child_env(AWS_ENV))
    partial = None
    try:
        deadline = time.monotonic() + 90
        while partial is None and time.monotonic() < deadline and child.poll() is None:
            partial = _partial_copy(client, prefix)
        assert partial is not None, "never saw a copy under way"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    with CheckpointManager(s3_dir, storage_options=opts) as there:  # the replica alone
        whole = [c.name for c in there.checkpoints]
    assert partial not in whole  # the half-copied checkpoint never shows
    for name in whole:
        assert len(checkpointer.load(f"{s3_dir}/{name}", storage_options=opts)["layers"]) == 32
    newest_local = [c.name for c in CheckpointManager(local).checkpoints][-1]
    with CheckpointManager(local, keep_last=1, replica=s3_dir, replica_storage_options=opts):
        pass  # the next run: the dead writer's objects go, the newest local checkpoint is copied
    assert check_directory(s3_dir, {"storage_options": opts})["checkpoints"] >= 1
    with CheckpointManager(s3_dir, storage_options=opts) as there:
        assert there.latest is not None and there.latest.name == newest_local
    trials["kills during replication"] += 1
