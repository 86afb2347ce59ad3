"""Kill tests: a real child process saves in a loop and is SIGKILLed at a random moment.

Each trial forks a fresh saving child (``_saver.py``), kills it after a random delay, then
opens the directory with a fresh manager in this process: ``restore("latest")`` and
``restore("best")`` verify without falling back, every listed checkpoint verifies and holds
exactly what was saved, and the manager's cleanup leaves no leftover of the engine. The
directory persists across the trials of a test, so each child also starts on the debris of
the previous kill. A final check runs in a fresh process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _checks import check_directory
from _relcommon import AWS_ENV, HERE, ForkServer, s3_options
from _saver import check_state, manager_kwargs

from checkpointer.storage import open_store

LOCAL_TRIALS = 100  # per async mode: 200 per run
S3_TRIALS = 13  # per (async mode, checksum mode): 52 per run


def _wait_for(log: Path, mark: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and mark in log.read_bytes():
            return True
        time.sleep(0.002)
    return False


def run_trials(
    server: ForkServer,
    n: int,
    directory: str,
    base: dict[str, Any],
    logs: Path,
    counts: Counter[str],
    seed: int,
    max_delay: float,
) -> None:
    """``n`` kill trials into ``directory``, each checked in-process right after the kill."""
    rng = random.Random(seed)
    logs.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        log = logs / f"trial{i:03d}.log"
        req = {**base, "directory": directory, "log": str(log), "replace": rng.random() < 0.3}
        pid = server.start(req)
        if i > 0 and rng.random() < 0.1:  # early: lands in startup (cleanup of old debris)
            time.sleep(rng.uniform(0, 0.03))
        else:  # the first trial always commits one save, so there is something to check
            assert _wait_for(log, b"\ns" if i == 0 else b"ready", 60), f"trial {i}: child stuck"
            time.sleep(rng.uniform(0, max_delay))
        server.kill(pid)
        notes = log.read_text().splitlines() if log.exists() else []
        errors = [x for x in notes if x.startswith("E")]
        assert not errors, f"trial {i}: the saving child failed on its own: {errors[0]}"
        if directory.startswith("s3://"):
            uploads = open_store(directory, base["storage_options"]).unfinished_uploads()
            counts["unfinished multipart uploads left by kills (aborted by cleanup)"] += len(
                uploads
            )
        try:
            got = check_directory(directory, manager_kwargs(req), check_state)
        except Exception as exc:
            raise AssertionError(f"trial {i} (seed {seed}, log {notes}): {exc}") from exc
        counts["kill trials"] += 1
        counts["saves committed before the kills"] += sum(x.startswith("s") for x in notes)
        counts["checkpoints verified after kills"] += got["checkpoints"]
        counts["kills before the first save of a child"] += not any(
            x.startswith("s") for x in notes
        )


def fresh_process_check(
    directory: str, kwargs: dict[str, Any], env: dict[str, str] | None = None
) -> None:
    """The final check, in a process that shares nothing with the savers or this one."""
    spec = {"here": str(HERE), "directories": [{"url": directory, "kwargs": kwargs}]}
    res = subprocess.run(
        [sys.executable, str(HERE / "_checks.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1])["checkpoints"] >= 1


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_local(
    fork_server: ForkServer, tmp_path: Path, trials: Counter[str], async_save: bool
) -> None:
    directory = str(tmp_path / "ckpts")
    run_trials(
        fork_server,
        LOCAL_TRIALS,
        directory,
        {"async": async_save},
        tmp_path / "logs",
        trials,
        seed=1234 + async_save,
        max_delay=0.2,
    )
    fresh_process_check(directory, manager_kwargs({}))
    trials[f"local kill trials ({'async' if async_save else 'sync'})"] += LOCAL_TRIALS


@pytest.mark.parametrize("checksum", ["default", "when_required"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_s3(
    s3_fork_server: ForkServer,
    s3_dir: str,
    s3_endpoint: str,
    tmp_path: Path,
    trials: Counter[str],
    async_save: bool,
    checksum: str,
) -> None:
    # Async trials save one 6 MiB array through 5 MiB multipart blocks, so kills also land
    # inside multipart uploads, which the next manager's cleanup must abort.
    extra = {"default_block_size": 5 << 20} if async_save else {}
    opts = s3_options(s3_endpoint, checksum, **extra)
    base = {
        "async": async_save,
        "storage_options": opts,
        "words": (21 << 16) if async_save else 1 << 16,
    }  # 5.25 MiB: two parts
    run_trials(
        s3_fork_server,
        S3_TRIALS,
        s3_dir,
        base,
        tmp_path / "logs",
        trials,
        seed=99 + async_save + 2 * (checksum == "default"),
        max_delay=0.8 if async_save else 0.4,
    )
    fresh_process_check(s3_dir, manager_kwargs(base), env=dict(os.environ, **AWS_ENV))
    trials[f"s3 kill trials ({'async' if async_save else 'sync'}, checksum {checksum})"] += (
        S3_TRIALS
    )
