"""The command as a whole: the demo, exit codes, no traceback for a user's mistake or
Ctrl-C, ``--storage-option``, a dead S3 endpoint failing fast, progress only on a terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _cli_lib import free_port

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.cli import main
from checkpointer.cli_common import S3_DEFAULTS, options_for, parse_option

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "checkpointer", *args], capture_output=True,
                          text=True, timeout=120, env=ENV, **kw)


def test_demo_learns_interrupts_and_resumes(tmp_path):
    d = str(tmp_path / "demo")
    proc = cli("demo", d)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "interrupted after epoch 5" in out
    assert "resumed from epoch05" in out and "continuing at epoch 6" in out
    assert "0 failed" in out and "latest" in out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("epoch ")]
    assert losses[-1] < losses[0] / 2  # it really learns
    mgr = CheckpointManager(d, monitor="val_loss")
    assert mgr.latest.epoch == 12
    assert len(mgr.checkpoints) <= 5
    state = checkpointer.load(mgr.best.url)
    assert state["train"]["params"]["w1"].shape == (2, 64)


def test_demo_refuses_a_directory_holding_other_checkpoints(run_dir, capsys):
    before = sorted(os.listdir(run_dir))
    assert main(["demo", run_dir]) == 2
    err = capsys.readouterr().err
    assert "already holds 2 checkpoints" in err and "new or empty directory" in err
    assert "KeyError" not in err and sorted(os.listdir(run_dir)) == before


def test_demo_on_s3(s3, capsys):
    url = s3.fresh()
    assert main(["demo", url, "--epochs", "4", "--interrupt-at", "2", *s3.args]) == 0
    out = capsys.readouterr().out
    assert "continuing at epoch 3" in out and "0 failed" in out
    assert CheckpointManager(url, storage_options=s3.options).latest.epoch == 4


def _interruptible() -> None:
    # A suite started in the background (``nohup make test &``) runs with SIGINT ignored,
    # which a child inherits, and Python then installs no KeyboardInterrupt handler; a
    # terminal's Ctrl-C reaches a program with the default disposition, as here.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_is_a_message_and_exit_130_not_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "checkpointer", "demo", str(tmp_path / "d"),
                             "--epochs", "100000", "--interrupt-at", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_interruptible)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until it is really training
            if line.startswith("epoch  2"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "checkpointer: interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["ls"], "the following arguments are required: url"),
    (["ls", "x", "-o", "novalue"], "is not KEY=VALUE"),
    (["ls", "nope://x"], "Protocol not known: nope"),
    (["diff", "a", "b", "--atol", "x"], "invalid float value"),
    (["frobnicate"], "invalid choice"),
])
def test_user_mistakes_exit_2_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_storage_options_nest_parse_json_and_keep_the_users_retries():
    assert parse_option("client_kwargs.endpoint_url=http://127.0.0.1:9") == (
        ("client_kwargs", "endpoint_url"), "http://127.0.0.1:9")
    assert parse_option("anon=true") == (("anon",), True)
    assert parse_option('key="0123"') == (("key",), "0123")
    pairs = [parse_option("config_kwargs.retries.max_attempts=10"), parse_option("anon=false")]
    opts = options_for(pairs, "s3://b/run")
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 10}  # the user's, not merged
    assert opts["config_kwargs"]["connect_timeout"] == S3_DEFAULTS[("config_kwargs", "connect_timeout")]
    assert opts["anon"] is False
    assert options_for(pairs, "/local/run") is None  # a local path takes no backend options
    assert options_for([], "memory://x") == {}


def test_a_dead_s3_endpoint_fails_fast_and_says_so(capsys, monkeypatch):
    pytest.importorskip("s3fs")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    assert main(["ls", "s3://cli/run", "-o", f"client_kwargs.endpoint_url={dead}"]) == 2
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert "Could not connect" in err and dead in err and "total_max_attempts" in err
    assert elapsed < 5, f"took {elapsed:.1f} s"  # botocore's defaults retry for ~10 s


def _big_run(tmp_path) -> str:
    url = str(tmp_path / "big")
    checkpointer.save(url, {"w": np.ones(1 << 20, np.float32)})  # 4 MiB
    return url


def _on_a_terminal(*args: str) -> str:
    """Run the command with stderr on a pseudo-terminal; what the terminal received."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "checkpointer", *args], stdout=subprocess.PIPE,
                            stderr=follower, env=ENV)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(leader)
    assert proc.returncode == 0
    return seen.decode(errors="replace")


def test_progress_on_a_terminal_only(tmp_path, capsys):
    url = _big_run(tmp_path)
    shown = _on_a_terminal("verify", url)
    assert "verify" in shown and "B/s" in shown and "4.00M" in shown
    assert "B/s" not in _on_a_terminal("verify", url, "--no-progress")
    assert main(["verify", url]) == 0  # stderr captured: not a terminal
    err = capsys.readouterr().err
    assert "B/s" not in err and "\r" not in err
