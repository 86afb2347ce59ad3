"""Fixtures of the command-line tests: a manager-written run directory, a local S3 server
(moto on 127.0.0.1, nothing else is ever reached) and the ``-o`` options that reach it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from _cli_lib import free_port

from checkpointer import CheckpointManager

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
LOSSES = [0.9, 0.5, 0.7, 0.4]


def write_run(directory: str, storage_options: dict[str, Any] | None = None) -> str:
    """Four epochs under monitor val_loss, keep_best=2: steps 20 (0.5) and 40 (0.4) remain."""
    with CheckpointManager(directory, monitor="val_loss", keep_best=2,
                           storage_options=storage_options) as mgr:
        for epoch, loss in enumerate(LOSSES, start=1):
            mgr.epoch_end(epoch, {"w": np.full((2, 3), epoch, np.float32), "step": epoch * 10},
                          step=epoch * 10, metrics={"val_loss": loss})
    return directory


@pytest.fixture()
def run_dir(tmp_path: Any) -> str:
    return write_run(str(tmp_path / "run"))


@dataclass(frozen=True)
class S3:
    """The moto server: its endpoint, fsspec options for the library, ``-o`` args for the CLI."""

    endpoint: str

    @property
    def options(self) -> dict[str, Any]:
        return {"client_kwargs": {"endpoint_url": self.endpoint}, "key": "testing", "secret": "testing"}

    @property
    def args(self) -> list[str]:
        return ["-o", f"client_kwargs.endpoint_url={self.endpoint}", "-o", "key=testing",
                "-o", "secret=testing"]

    def fresh(self) -> str:
        """A new, empty ``s3://`` directory."""
        return f"s3://cli/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_ENV.items():
            mp.setenv(key, value)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        port = free_port()
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="cli")
        try:
            yield S3(url)
        finally:
            server.stop()


@pytest.fixture()
def s3_run(s3: S3) -> str:
    """The run of :func:`write_run` on the S3 server."""
    return write_run(s3.fresh(), s3.options)
