"""Helpers shared by the reliability tests (imported by name: ``conftest`` is not unique
across the test tree, so nothing is imported from it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
_COUNTS: Counter[str] = Counter()
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# botocore's checksum settings: its default ("when_supported") and the opt-out.
CHECKSUM_MODES = {
    "default": {},
    "when_required": {
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
    },
}


def s3_options(endpoint: str, checksum: str = "default", **extra: Any) -> dict[str, Any]:
    """fsspec storage options for the moto server under one botocore checksum setting."""
    opts: dict[str, Any] = {
        "client_kwargs": {"endpoint_url": endpoint},
        "key": "testing",
        "secret": "testing",
        **extra,
    }
    if CHECKSUM_MODES[checksum]:
        opts["config_kwargs"] = dict(CHECKSUM_MODES[checksum])
    return opts


class ForkServer:
    """A running ``_saver.py``: ``start(request) -> pid`` forks a saving child."""

    def __init__(self, extra_args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_saver.py"), *extra_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def start(self, request: dict[str, Any]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.proc.poll()})")
        return int(json.loads(line)["pid"])

    @staticmethod
    def kill(pid: int) -> None:
        """SIGKILL ``pid`` and wait until it is gone (the server reaps it at once)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.001)
        raise RuntimeError(f"child {pid} did not die")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(
        os.environ,
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
        **(extra or {}),
    )
    return env
