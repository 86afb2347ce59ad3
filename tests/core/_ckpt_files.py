"""Shared by the hostile-file tests: a valid checkpoint to damage, and its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import checkpointer
from checkpointer.frame import decode_framed, encode_framed
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME


def _valid(tmp_path: Path) -> Path:
    ckpt = tmp_path / "c"
    checkpointer.save(ckpt, {"w": np.arange(4, dtype=np.float32), "meta": "x"})
    return ckpt


def _manifest(ckpt: Path) -> dict[str, Any]:
    m: dict[str, Any] = decode_framed((ckpt / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    return m


def _put_manifest(ckpt: Path, m: Any) -> None:
    (ckpt / MANIFEST_NAME).write_bytes(encode_framed(MANIFEST_MAGIC, m))
