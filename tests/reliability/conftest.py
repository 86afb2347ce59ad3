"""Fixtures of the reliability campaign: a local S3 server, fork servers of saving children,
a small tmpfs, and a summary of trial counts printed at the end of the run.

Every count a test adds with the ``trials`` fixture appears in the terminal summary
(``reliability: ...`` lines), so ``pytest -q`` shows how many kills, faults and fuzz
cases were actually run.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _relcommon import _COUNTS, AWS_ENV, ForkServer, _child_env


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the trial counts of this run (shown with ``-q`` too)."""
    if _COUNTS:
        terminalreporter.section("reliability trial counts")
        for key in sorted(_COUNTS):
            terminalreporter.write_line(f"reliability: {key}: {_COUNTS[key]}")


@pytest.fixture
def trials(record_property: Any) -> Counter[str]:
    """A counter whose contents are added to the run's summary when the test ends."""
    mine: Counter[str] = Counter()
    yield mine
    _COUNTS.update(mine)
    for key, value in mine.items():
        record_property(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session; its URL."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        port = _free_port()
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="rel")
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture
def s3_dir(s3_endpoint: str) -> str:
    """A fresh, empty ``s3://`` directory."""
    return f"s3://rel/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def fork_server() -> Iterator[ForkServer]:
    """Fork server of local saving children (numpy + checkpointer imported once)."""
    server = ForkServer([], _child_env())
    yield server
    server.close()


@pytest.fixture(scope="session")
def s3_fork_server(s3_endpoint: str) -> Iterator[ForkServer]:
    """Fork server of saving children that also have s3fs imported."""
    server = ForkServer(["--s3"], _child_env(AWS_ENV))
    yield server
    server.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 10 MiB tmpfs mounted for this test (skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None or not sys.platform.startswith("linux"):
        pytest.skip("cannot mount a tmpfs here: no Linux mount command")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
