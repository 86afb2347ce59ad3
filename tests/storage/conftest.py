"""Backends of the storage contract suite.

Each backend is a fixture parameter; a future backend (``s3`` through moto, ...) is one more
entry in ``BACKENDS`` and one more branch in :func:`backend`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest

BACKENDS = ["local", "memory"]


@dataclass
class Backend:
    """A checkpoint directory on one store, with raw access that bypasses the engine."""

    kind: str
    url: str
    fs: Any
    root: str

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self.path(rel)))

    def read(self, rel: str) -> bytes:
        return bytes(self.fs.cat_file(self.path(rel)))

    def write(self, rel: str, data: bytes) -> None:
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(self.path(rel), data)

    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def listdir(self, rel: str = "") -> list[str]:
        self.fs.invalidate_cache()
        where = self.path(rel) if rel else self.root
        if not self.fs.exists(where):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(where, detail=False))

    def flip_last_byte(self, rel: str) -> None:
        data = bytearray(self.read(rel))
        data[-1] ^= 0xFF
        self.fs.pipe_file(self.path(rel), bytes(data))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A fresh, empty checkpoint directory on each backend."""
    if request.param == "local":
        root = str(tmp_path / "ckpts")
        yield Backend("local", root, fsspec.filesystem("file"), root)
        return
    url = f"memory://contract-{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(url)
    b = Backend("memory", url, fs, root.rstrip("/"))
    yield b
    if fs.exists(b.root):
        fs.rm(b.root, recursive=True)
