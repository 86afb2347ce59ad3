"""Replica copies in a child process (``checkpointer.replica_process``): when a copy goes to a
child, that it is the child that writes, that its errors come back as the same classes, that
it ignores the signals a process group gets and dies with its parent; and that a zombie
writer counts as dead for cleanup."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager, StorageError, replica_process
from checkpointer.errors import ChecksumMismatchError
from checkpointer.owners import HOST, owner_is_dead
from checkpointer.plan import CheckpointWarning
from checkpointer.replica_process import CopyProcess, child_request
from checkpointer.storage import open_store

S3 = ("s3://bucket/run", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})


def test_which_copies_go_to_a_child(monkeypatch, tmp_path):
    local = (str(tmp_path), None)
    assert child_request(local, S3) == {"source": list(local), "dest": list(S3)}
    assert child_request(local, (str(tmp_path / "rep"), None)) is None  # local to local: no GIL at stake
    assert child_request(local, ("memory://rep", None)) is None  # a child cannot see this memory
    assert child_request(("memory://here", None), S3) is None
    assert child_request(None, S3) is None  # a store from a ready filesystem object
    assert child_request(local, ("s3://b/r", {"client_kwargs": {"config": object()}})) is None
    assert child_request(local, ("s3://b/r", {"retries": (1, 2)})) is None  # a tuple is not JSON
    monkeypatch.setattr(replica_process, "MODE", "always")
    assert child_request(local, (str(tmp_path / "rep"), None)) is not None
    assert child_request(local, ("memory://rep", None)) is None
    monkeypatch.setattr(replica_process, "MODE", "never")
    assert child_request(local, S3) is None


def test_stores_say_how_they_were_opened(tmp_path):
    assert open_store(tmp_path).origin == (str(tmp_path), None)
    assert open_store("memory://x", {"skip_instance_cache": True}).origin == ("memory://x", {"skip_instance_cache": True})
    fs = open_store("memory://y").fs  # type: ignore[attr-defined]
    assert open_store("memory://y", filesystem=fs).origin is None


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_the_manager_copies_in_a_child_that_commits_whole_checkpoints(monkeypatch, tmp_path, async_save):
    monkeypatch.setattr(replica_process, "MODE", "always")

    def in_this_process(*_: Any) -> None:
        raise AssertionError("copied in the training process")

    monkeypatch.setattr(replica_process, "copy_with_manifest", in_this_process)  # the child has the real one
    rep = str(tmp_path / "rep")
    with CheckpointManager(tmp_path / "local", replica=rep, async_save=async_save, monitor="loss") as mgr:
        for step in (1, 2):
            mgr.save({"w": np.full(1000, step, np.float32)}, step=step, metrics={"loss": 1 / step})
            mgr.wait()
        assert [c.name for c in mgr.checkpoints] == ["step-000000001", "step-000000002"]
    with CheckpointManager(rep, monitor="loss") as there:  # the replica alone: indexed, ranked
        assert [c.name for c in there.checkpoints] == ["step-000000001", "step-000000002"]
        assert there.best is not None and there.best.step == 2
        assert (there.restore().state["w"] == 2).all()


def test_a_corrupt_source_comes_back_as_the_same_error_and_nothing_shows(monkeypatch, tmp_path):
    local = tmp_path / "local"
    checkpointer.save(local / "step-1", {"w": np.arange(4096, dtype=np.float32)})
    data = next((local / "step-1").glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF
    data.write_bytes(bytes(raw))
    request = {"source": [str(local), None], "dest": [str(tmp_path / "rep"), None]}
    child = CopyProcess(request)
    with pytest.raises(ChecksumMismatchError, match="checksum"):
        child.copy("step-1")
    assert not (tmp_path / "rep" / "step-1").exists()
    checkpointer.save(local / "step-2", {"w": np.ones(8, np.float32)})
    assert child.copy("step-2").nbytes > 0  # the same child goes on with the next copy
    assert (checkpointer.load(tmp_path / "rep" / "step-2")["w"] == 1).all()
    child.close()
    shutil.rmtree(local / "step-2")
    monkeypatch.setattr(replica_process, "MODE", "always")
    with pytest.warns(CheckpointWarning, match="replication .* failed"):  # through the manager
        mgr = CheckpointManager(local, replica=tmp_path / "rep2")
        mgr.wait()
        assert [c.name for c in mgr.checkpoints] == ["step-1"]
        with pytest.raises(StorageError, match="never reached the replica.*does not match its checksum"):
            mgr.close()
    assert not (tmp_path / "rep2" / "step-1").exists()


def test_a_child_that_dies_without_an_answer_is_a_storage_error(monkeypatch, tmp_path):
    child = CopyProcess({"source": [str(tmp_path), None], "dest": [str(tmp_path / "r"), None]})
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(StorageError, match="died .*without an answer"):
        child.copy("x")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(StorageError, match="cannot start"):
        child.copy("x")
    monkeypatch.undo()  # a working python again: the next copy starts a new child
    checkpointer.save(tmp_path / "x", {"w": np.zeros(2)})
    assert child.copy("x").nbytes > 0
    child.close()


def test_a_child_that_cannot_run_sends_the_copies_to_the_thread(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(replica_process, "MODE", "always")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # as an embedded interpreter would be
    rep = tmp_path / "rep"
    with CheckpointManager(tmp_path / "local", replica=rep) as mgr:
        for step in (1, 2):
            mgr.save({"w": np.full(8, step, np.float32)}, step=step)
            mgr.wait()
    assert [c.name for c in CheckpointManager(rep).checkpoints] == ["step-000000001", "step-000000002"]
    said = [r.getMessage() for r in caplog.records if "in this process from now on" in r.getMessage()]
    assert len(said) == 1 and "died" in said[0]  # once: the second copy went to the thread at once


PARENT = textwrap.dedent("""
    import sys
    from checkpointer.replica_process import CopyProcess
    src, endpoint = sys.argv[1], sys.argv[2]
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "key": "k", "secret": "s",
            "config_kwargs": {"connect_timeout": 600, "read_timeout": 600, "retries": {"max_attempts": 1}}}
    print("copying", flush=True)
    CopyProcess({"source": [src, None], "dest": ["s3://bucket/rep", opts]}).copy("step-1")
""")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat.rpartition(b")")[2].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    return owner_is_dead(f"{HOST}.{pid}.0")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_ignores_group_signals_and_dies_with_its_parent(tmp_path):
    pytest.importorskip("s3fs")
    checkpointer.save(tmp_path / "step-1", {"w": np.zeros(16, np.float32)})
    with socket.socket() as hang:  # an S3 endpoint that accepts and never answers
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        endpoint = f"http://127.0.0.1:{hang.getsockname()[1]}"
        parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), endpoint],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert parent.stdout is not None and parent.stdout.readline() == "copying\n"
            deadline = time.monotonic() + 30
            while not (kids := _children(parent.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(kids) == 1, "the copy process never started"
            child = kids[0]
            time.sleep(1.0)  # its signal dispositions are set before it reads the request
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                os.kill(child, sig)
            time.sleep(0.3)
            assert not _gone(child), "a signal to the process group stopped the copy"
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + 5
            while not _gone(child) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _gone(child), "the copy process outlived its parent"
        finally:
            parent.kill()
            parent.wait()


def test_a_zombie_writer_is_dead(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    token: Any = f"{HOST}.{proc.pid}.abcd1234"
    assert not owner_is_dead(token)  # running
    assert proc.stdin is not None
    proc.stdin.close()
    deadline = time.monotonic() + 10
    while not owner_is_dead(token) and time.monotonic() < deadline:  # exited, not yet reaped
        time.sleep(0.02)
    assert owner_is_dead(token)
    assert Path(f"/proc/{proc.pid}").exists() or not sys.platform.startswith("linux")
    proc.wait()
    assert owner_is_dead(token)
