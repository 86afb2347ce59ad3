"""The replica tier (DESIGN 13) on a local folder and on ``memory://``: every due commit copied
in the background and committed there, retention per tier, the two tiers as one view, a
new machine resuming from the replica, a failing replica that never fails a save, the
preemption save, async saves and several ranks (threads)."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _ranks import RANKS, ThreadCoordinator, run_ranks

import checkpointer
from checkpointer import CheckpointManager, ConfigurationError, StorageError, replica_process
from checkpointer.plan import CheckpointWarning
from checkpointer.storage import open_store


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(64, step, np.float32), "step": step}


def replica_url(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "replica") if kind == "local" else f"memory://replica-{uuid.uuid4().hex[:12]}"


def names(url: str) -> list[str]:
    """What a manager opened on ``url`` alone lists."""
    with CheckpointManager(url) as mgr:
        return [c.name for c in mgr.checkpoints]


def files(url: str) -> list[str]:
    return sorted(open_store(url).list_files())


KINDS = ["local", "memory"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_commit_reaches_the_replica_an_ordinary_checkpoint_directory(tmp_path, kind, async_save):
    rep = replica_url(kind, tmp_path)
    with CheckpointManager(tmp_path / "local", replica=rep, async_save=async_save, monitor="loss") as mgr:
        for step in range(1, 4):
            mgr.save(state(step), step=step, metrics={"loss": 1.0 / step})
            mgr.wait()  # without it a copy still waiting may give way to a newer one
    assert names(rep) == ["step-000000001", "step-000000002", "step-000000003"]
    for step in range(1, 4):  # each verifies, and holds what was saved
        got = checkpointer.load(f"{rep}/step-{step:09d}")
        assert got["step"] == step and (got["w"] == step).all()
    with CheckpointManager(rep, monitor="loss") as there:  # the index carries the monitor
        assert there.best is not None and there.best.step == 3
    assert not [f for f in files(rep) if f.startswith(".ckpt-tmp") or f.startswith(".ckpt-old")]


def test_replica_every_copies_every_nth_commit_by_sequence(tmp_path):
    rep = str(tmp_path / "replica")
    with CheckpointManager(tmp_path / "local", replica=rep, replica_every=2) as mgr:
        for step in range(1, 6):
            mgr.save(state(step), step=step)
            mgr.wait()
    assert names(rep) == ["step-000000002", "step-000000004"]  # the 2nd and 4th commit
    with CheckpointManager(tmp_path / "local", replica=rep, replica_every=2) as mgr:
        mgr.save(state(6), step=6)  # seq 5: the 6th commit, due (a resumed run keeps the rhythm)
    assert names(rep)[-1] == "step-000000006"


@pytest.mark.parametrize("kind", KINDS)
def test_retention_per_tier_and_the_view_of_both(tmp_path, kind):
    rep = replica_url(kind, tmp_path)
    local = tmp_path / "local"
    with CheckpointManager(local, keep_last=1, replica=rep, replica_keep_last=3) as mgr:
        for step in range(1, 6):
            mgr.save(state(step), step=step)
            mgr.wait()
        assert [c.step for c in mgr.checkpoints] == [3, 4, 5]  # both tiers
        urls = {c.step: c.url for c in mgr.checkpoints}
        assert urls[5] == str(local / "step-000000005")  # in both: read from the local tier
        assert urls[3] == open_store(rep).url_of("step-000000003")  # the replica's alone
        assert mgr.latest.step == 5
        assert mgr.restore(3).info.url == urls[3] and mgr.restore(3).state["step"] == 3
    assert names(str(local)) == ["step-000000005"]
    assert names(rep) == ["step-000000003", "step-000000004", "step-000000005"]


def test_replica_retention_defaults_to_the_local_one_and_keeps_the_best(tmp_path):
    rep = str(tmp_path / "replica")
    losses = [0.5, 0.1, 0.7, 0.6, 0.9]
    with CheckpointManager(tmp_path / "local", monitor="loss", keep_last=2, replica=rep) as mgr:
        for step, loss in enumerate(losses, start=1):
            mgr.save(state(step), step=step, metrics={"loss": loss})
            mgr.wait()
        assert mgr.best.step == 2
    assert names(rep) == ["step-000000002", "step-000000004", "step-000000005"]  # last 2 + best
    with CheckpointManager(tmp_path / "l2", monitor="loss", keep_best=1, keep_last=None,
                           replica=str(tmp_path / "r2"), replica_keep_best=2) as mgr:
        for step, loss in enumerate(losses, start=1):
            mgr.save(state(step), step=step, metrics={"loss": loss})
            mgr.wait()
    assert names(str(tmp_path / "r2")) == ["step-000000001", "step-000000002", "step-000000005"]


def test_replica_retention_never_deletes_another_runs_checkpoints(tmp_path):
    rep = tmp_path / "replica"
    with CheckpointManager(rep, keep_last=5, filename="other-{step}") as other:  # other settings
        other.save(state(0), step=0)
    checkpointer.save(rep / "oneoff", state(0))
    with CheckpointManager(tmp_path / "local", keep_last=1, replica=str(rep)) as mgr:
        for step in range(1, 4):
            mgr.save(state(step), step=step)
            mgr.wait()
    assert names(str(rep)) == ["oneoff", "other-0", "step-000000003"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_machine_resumes_from_the_replica(tmp_path, kind):
    rep = replica_url(kind, tmp_path)
    local = tmp_path / "local"
    kw = {"monitor": "loss", "keep_last": 2, "replica": rep}
    with CheckpointManager(local, **kw) as mgr:
        for step, loss in ((1, 0.3), (2, 0.5), (3, 0.4)):
            mgr.save(state(step), step=step, metrics={"loss": loss})
            mgr.wait()
    shutil.rmtree(local)  # the machine is gone; a new one has an empty local directory
    with CheckpointManager(local, **kw) as mgr:
        assert [c.step for c in mgr.checkpoints] == [1, 2, 3]  # the best (1) and the last two
        assert all(c.url.startswith(open_store(rep).url) for c in mgr.checkpoints)
        got = mgr.restore()
        assert got.state["step"] == 3 and got.info.url == open_store(rep).url_of("step-000000003")
        assert mgr.restore("best").state["step"] == 1 and mgr.best.step == 1
        info = mgr.save(state(4), step=4, metrics={"loss": 0.2})
        assert info.url == str(local / "step-000000004") and mgr.latest.name == info.name
    with CheckpointManager(rep, monitor="loss") as there:
        assert [c.step for c in there.checkpoints] == [1, 3, 4]  # 4 seq after 3: retention continued
        assert there.best.step == 4
    assert names(str(local)) == ["step-000000004"]


def test_a_broken_local_copy_falls_back_to_the_replica_copy(tmp_path, caplog):
    rep, local = str(tmp_path / "replica"), tmp_path / "local"
    with CheckpointManager(local, replica=rep) as mgr:
        for step in (1, 2):
            mgr.save(state(step), step=step)
            mgr.wait()
    damage(local / "step-000000002")
    with CheckpointManager(local, replica=rep) as mgr:
        with pytest.warns(CheckpointWarning, match="step-000000002 is broken"):
            got = mgr.restore()
        assert got.state["step"] == 2 and got.info.url == open_store(rep).url_of("step-000000002")
        with pytest.raises(checkpointer.CorruptCheckpointError):
            mgr.restore("step-000000002")  # a named checkpoint never falls back
    damage(tmp_path / "replica" / "step-000000002")
    with CheckpointManager(local, replica=rep) as mgr:
        with pytest.warns(CheckpointWarning) as warned:
            got = mgr.restore()
        assert got.state["step"] == 1 and got.info.url == str(local / "step-000000001")
        broken = [str(w.message).split(" is broken")[0] for w in warned]
        assert broken == [f"checkpoint {local / 'step-000000002'}", f"checkpoint {open_store(rep).url_of('step-000000002')}"]


def damage(folder: Path) -> None:
    data = next(folder.glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_a_failing_replica_never_fails_a_save_warns_retries_and_close_raises(tmp_path, caplog):
    blocker = tmp_path / "replica"
    blocker.write_text("not a directory")  # every write there fails, as a full bucket would
    caplog.set_level(logging.WARNING, "checkpointer")
    with pytest.warns(CheckpointWarning, match="replication of .* failed") as warned:
        mgr = CheckpointManager(tmp_path / "local", keep_last=1, replica=str(blocker))
        for step in (1, 2):
            assert mgr.save(state(step), step=step).step == step  # the local saves succeed
            mgr.wait()
        failed = [r.getMessage() for r in caplog.records if "replication of" in r.getMessage()]
        assert len(failed) == 2 and all("File exists" in m for m in failed)  # one per replication
        assert names(str(tmp_path / "local")) == ["step-000000002"]
        with pytest.raises(StorageError, match="step-000000002 never reached the replica"):
            mgr.close()  # after one more try
    tried = [str(w.message).split(" to ")[0].rsplit("/", 1)[1] for w in warned]
    assert tried == ["step-000000001", "step-000000002", "step-000000002"]
    blocker.unlink()  # the bucket has room again: the next replication catches up
    with CheckpointManager(tmp_path / "local", keep_last=1, replica=str(blocker)) as mgr:
        mgr.save(state(3), step=3)
    assert names(str(blocker)) == ["step-000000003"]  # the replica's keep_last=1 too


def test_a_due_checkpoint_that_failed_is_kept_locally_and_close_retries_it(tmp_path):
    blocker = tmp_path / "replica"
    blocker.write_text("x")
    mgr = CheckpointManager(tmp_path / "local", keep_last=1, replica=str(blocker), replica_every=2)
    with pytest.warns(CheckpointWarning, match="replication of .*step-000000002"):
        for step in (1, 2, 3):  # 2 is due and fails; 3 is not due
            mgr.save(state(step), step=step)
            mgr.wait()
    assert names(str(tmp_path / "local")) == ["step-000000002", "step-000000003"]  # 2 kept for the replica
    blocker.unlink()  # the replica is back before close: its final retry succeeds
    mgr.close()
    assert names(str(blocker)) == ["step-000000002"]


def test_the_next_run_catches_up_the_newest_local_checkpoint(tmp_path):
    blocker = tmp_path / "replica"
    blocker.write_text("x")
    mgr = CheckpointManager(tmp_path / "local", replica=str(blocker))
    with pytest.warns(CheckpointWarning, match="replication of"):
        mgr.save(state(1), step=1)
        with pytest.raises(StorageError, match="step-000000001"):
            mgr.close()
    blocker.unlink()
    with CheckpointManager(tmp_path / "local", replica=str(blocker)):
        pass  # nothing saved: the newest local checkpoint is copied at open
    assert names(str(blocker)) == ["step-000000001"]


def _gate(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str], threading.Semaphore]:
    """Copies wait for the event: a slow replica, deterministic. The semaphore counts the
    copies that started."""
    release, started, began = threading.Event(), [], threading.Semaphore(0)
    real = replica_process.copy_with_manifest

    def slow(src: Any, name: str, dst: Any) -> Any:
        started.append(name)
        began.release()
        assert release.wait(60), "the test never released the replica"
        return real(src, name, dst)
    monkeypatch.setattr(replica_process, "copy_with_manifest", slow)
    return release, started, began


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_slow_replica_never_blocks_saves_and_local_retention_keeps_what_it_copies(
        tmp_path, monkeypatch, async_save):
    release, started, began = _gate(monkeypatch)
    rep, local = str(tmp_path / "replica"), tmp_path / "local"
    mgr = CheckpointManager(local, keep_last=1, replica=rep, async_save=async_save)
    mgr.save(state(1), step=1)
    assert began.acquire(timeout=60)  # the copy of 1 is in flight, held
    for step in (2, 3):  # 2 waits, then 3 replaces it (the newest wins)
        mgr.save(state(step), step=step)
        mgr._wait_saves()
    assert started == ["step-000000001"]
    assert names(str(local)) == ["step-000000001", "step-000000003"]  # 1 is being copied: kept
    release.set()
    mgr.wait()
    assert started == ["step-000000001", "step-000000003"]  # 2 was never copied
    assert names(rep) == ["step-000000003"]  # the replica's keep_last=1 too
    mgr.save(state(4), step=4)
    mgr.close()
    assert names(str(local)) == ["step-000000004"] and names(rep) == ["step-000000004"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_preemption_save_is_always_replicated_and_close_waits_for_it(tmp_path, monkeypatch, async_save):
    release, started, _ = _gate(monkeypatch)
    rep = str(tmp_path / "replica")
    mgr = CheckpointManager(tmp_path / "local", every_n_steps=100, replica=rep, replica_every=1000,
                            async_save=async_save)
    mgr.step_end(100, state(100))  # scheduled, not due for the replica
    mgr.request_preemption()
    info = mgr.step_end(101, state(101))  # returns once committed locally, the copy held
    assert mgr.preempted and info.step == 101 and started in ([], ["step-000000101"])
    threading.Timer(0.2, release.set).start()
    mgr.close()  # waits for the copy
    assert names(rep) == ["step-000000101"]


def test_replica_options_are_validated():
    for kw, msg in (({"replica": "memory://r", "replica_every": 0}, "replica_every must be a positive int"),
                    ({"replica": "memory://r", "replica_keep_last": -1}, "replica_keep_last must be"),
                    ({"replica": "memory://r", "replica_keep_best": 1}, "replica_keep_best needs a monitor"),
                    ({"replica_every": 2}, "replica_every given without replica=URL"),
                    ({"replica": "memory://here"}, "is the manager's own directory")):
        with pytest.raises(ConfigurationError, match=msg):
            CheckpointManager("memory://here", **kw)


def test_several_ranks_replicate_from_rank_0_and_restore_from_the_same_tier(tmp_path):
    local, rep = tmp_path / "local", str(tmp_path / "replica")

    def first(rank: int, coord: ThreadCoordinator) -> list[str]:
        with CheckpointManager(local, replica=rep, keep_last=1, replica_keep_last=2, coordinator=coord) as mgr:
            for step in (1, 2):
                mgr.save({"w": np.full(4, step, np.float32), "step": step}, step=step)
                mgr.wait()  # on every rank: rank 0's copy, then its view
            return [c.url for c in mgr.checkpoints]

    views = run_ranks(first)
    assert all(v == views[0] for v in views) and len(views[0]) == 2  # 1 only in the replica now
    shutil.rmtree(local)

    def resumed(rank: int, coord: ThreadCoordinator) -> tuple[str, int]:
        with CheckpointManager(local, replica=rep, keep_last=1, coordinator=coord) as mgr:
            got = mgr.restore()
            return got.info.url, got.state["step"]

    assert run_ranks(resumed) == [(open_store(rep).url_of("step-000000002"), 2)] * RANKS
