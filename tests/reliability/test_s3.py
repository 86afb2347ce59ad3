"""Remote storage for real: the manager end to end on ``s3://`` through s3fs and a local
moto server, under botocore's default checksum setting and under ``when_required``.

Save, rank, retain, reopen (resume from storage alone), restore latest/best, replace a
name, async saves, one-off save/load, and cleanup aborting the unfinished multipart
uploads of dead writers while keeping those of live ones.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest
from _checks import engine_leftovers, multipart_leftovers
from _relcommon import CHECKSUM_MODES, s3_options

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.owners import HOST as _HOST
from checkpointer.storage import open_store

LOSSES = [0.9, 0.5, 0.7, 0.3, 0.8, 0.6]


def state_at(step: int, words: int = 1000) -> dict[str, Any]:
    return {"w": np.full(words, step, np.float32), "meta": {"step": step, "name": "run"}}


def check_state(state: Any, step: int) -> None:
    assert state["meta"] == {"step": step, "name": "run"} and (state["w"] == step).all()


def no_leftovers(url: str, opts: dict[str, Any], names: list[str]) -> None:
    store = open_store(url, opts)
    assert not engine_leftovers(store, names) + multipart_leftovers(store)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("checksum", list(CHECKSUM_MODES))
def test_manager_end_to_end(
    s3_dir: str, s3_endpoint: str, checksum: str, async_save: bool, trials: Counter[str]
) -> None:
    opts = s3_options(s3_endpoint, checksum)
    kw = {"monitor": "val_loss", "keep_last": 2, "keep_best": 1, "storage_options": opts}
    with CheckpointManager(s3_dir, async_save=async_save, **kw) as mgr:
        for step, loss in enumerate(LOSSES[:4]):
            mgr.epoch_end(step, lambda s=step: state_at(s), step=step, metrics={"val_loss": loss})
        mgr.wait()
        # kept: last two (2, 3) and the best (3, loss 0.3); 0 and 1 deleted after later commits
        assert [i.step for i in mgr.checkpoints] == [2, 3]
    with CheckpointManager(s3_dir, async_save=async_save, **kw) as mgr:  # resume from storage
        assert [i.step for i in mgr.checkpoints] == [2, 3] and mgr.best.step == 3
        for step in (4, 5):
            mgr.epoch_end(step, state_at(step), step=step, metrics={"val_loss": LOSSES[step]})
        mgr.wait()
        assert [i.step for i in mgr.checkpoints] == [3, 4, 5]  # the best (3) survives
        latest, best = mgr.restore("latest"), mgr.restore("best")
        check_state(latest.state, 5)
        check_state(best.state, 3)
        names = [i.name for i in mgr.checkpoints]
    for name in names:
        check_state(
            checkpointer.load(f"{s3_dir}/{name}", storage_options=opts),
            int(name.rsplit("-", 1)[1].lstrip("0") or 0),
        )
    no_leftovers(s3_dir, opts, names)
    trials["s3 end-to-end runs"] += 1


@pytest.mark.parametrize("checksum", list(CHECKSUM_MODES))
def test_replace_a_name_and_one_off_calls(s3_dir: str, s3_endpoint: str, checksum: str) -> None:
    opts = s3_options(s3_endpoint, checksum)
    with CheckpointManager(s3_dir, filename="slot", storage_options=opts) as mgr:
        for step in range(3):
            mgr.save(state_at(step, 3000), step=step)
            check_state(mgr.restore("latest").state, step)
        assert [i.name for i in mgr.checkpoints] == ["slot"]
    no_leftovers(s3_dir, opts, ["slot"])
    checkpointer.save(f"{s3_dir}/oneoff", state_at(7), metadata={"k": 1}, storage_options=opts)
    check_state(checkpointer.load(f"{s3_dir}/oneoff", storage_options=opts), 7)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_aborts_unfinished_uploads_of_dead_writers(s3_dir: str, s3_endpoint: str) -> None:
    opts = s3_options(s3_endpoint)
    store = open_store(s3_dir, opts)
    bucket, _, prefix = store.root.partition("/")
    dead = f"data-{_HOST}.{_dead_pid()}.0badf00d-00000.safetensors"
    live = f"data-{_HOST}.1.0badf00d-00000.safetensors"  # pid 1 is alive: never ours to abort
    foreign = "someone-elses-upload.bin"
    for key in (f"c/{dead}", f"c/{live}", foreign):
        store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=f"{prefix}/{key}")
    assert len(store.unfinished_uploads()) == 3
    CheckpointManager(s3_dir, storage_options=opts).close()
    left = sorted(rel for rel, _ in store.unfinished_uploads())
    assert left == sorted([f"c/{live}", foreign])
    for rel, upload in store.unfinished_uploads():
        store.abort_upload(rel, upload)
