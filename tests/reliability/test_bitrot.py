"""Bit rot and truncation: damage every byte of every kind of file the format writes.

A one-bit flip at every byte position, a one-byte truncation, a few deeper truncations and
one appended byte, in the data files (header region and data region) and the manifest:
each is detected by ``checkpointer.load`` (verify) as a ``CorruptCheckpointError``. Through
a manager, ``restore("latest")`` / ``restore("best")`` fall back to the newest / next best
checkpoint that verifies with a ``CheckpointWarning`` naming the broken one, and raise with
``fallback=False``. A damaged index is rebuilt silently: it is only a cache.
"""

from __future__ import annotations

import struct
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager, CheckpointWarning, CorruptCheckpointError
from checkpointer.frame import decode_framed
from checkpointer.index import INDEX_MAGIC, INDEX_NAME
from checkpointer.manifest import MANIFEST_NAME

LOSSES = [0.3, 0.2, 0.4]  # best: step 1; latest: step 2


def state_at(step: int) -> dict[str, object]:
    return {
        "step": step,
        "w": np.full(40, step, np.float32),
        "b": np.arange(24) + step,
        "h": (np.full(16, step, np.float16), "tag", None),
    }


def same(state: object, step: int) -> bool:
    want = state_at(step)
    return (
        state["step"] == step
        and (state["w"] == want["w"]).all()  # type: ignore[index]
        and (state["b"] == want["b"]).all()
        and (state["h"][0] == want["h"][0]).all()
    )  # type: ignore[index]


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    with CheckpointManager(d, monitor="loss", max_file_bytes=200) as mgr:
        for step, loss in enumerate(LOSSES):
            mgr.save(state_at(step), step=step, metrics={"loss": loss})
    return d


def damages(data: bytes, header_len: int | None) -> Iterator[tuple[str, bytes]]:
    """Every one-bit flip, a one-byte truncation and other cuts, one appended byte."""
    for pos in range(len(data)):
        region = (
            "flip" if header_len is None else ("flip-header" if pos < header_len else "flip-data")
        )
        yield region, data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]
    for cut in sorted(
        {len(data) - 1, 0, 7, 8, len(data) // 2} | ({header_len} if header_len else set())
    ):
        if 0 <= cut < len(data):
            yield "truncate", data[:cut]
    yield "append", data + b"\0"


def files_of(ckpt: Path) -> list[tuple[Path, int | None]]:
    out = []
    for f in sorted(ckpt.iterdir()):
        head = (
            8 + struct.unpack("<Q", f.read_bytes()[:8])[0] if f.suffix == ".safetensors" else None
        )
        out.append((f, head))
    assert len(out) >= 3, "expected several data files and a manifest"
    return out


def test_every_byte_of_every_file_is_checked(ckdir: Path, trials: Counter[str]) -> None:
    latest = ckdir / "step-000000002"
    for path, header_len in files_of(latest):
        original = path.read_bytes()
        kind = "manifest" if path.name == MANIFEST_NAME else "data"
        for what, damaged in damages(original, header_len):
            path.write_bytes(damaged)
            with pytest.raises(CorruptCheckpointError):
                checkpointer.load(latest)
            trials[f"bit-rot cases detected by load: {kind} {what}"] += 1
        path.write_bytes(original)
    assert same(checkpointer.load(latest), 2)


def sample(data: bytes, header_len: int | None) -> list[tuple[str, bytes]]:
    """A few damages per region, for the slower manager checks."""
    every = list(damages(data, header_len))
    picked: dict[str, list[tuple[str, bytes]]] = {}
    for what, damaged in every:
        picked.setdefault(what, []).append((what, damaged))
    return [
        cases[i] for cases in picked.values() for i in sorted({0, len(cases) // 2, len(cases) - 1})
    ]


@pytest.mark.parametrize("which", ["latest", "best"])
def test_restore_falls_back_with_a_warning(ckdir: Path, which: str, trials: Counter[str]) -> None:
    broken, expect = {"latest": ("step-000000002", 1), "best": ("step-000000001", 0)}[which]
    for path, header_len in files_of(ckdir / broken):
        original = path.read_bytes()
        for _, damaged in sample(original, header_len):
            path.write_bytes(damaged)
            mgr = CheckpointManager(ckdir, monitor="loss")
            with pytest.warns(CheckpointWarning, match=broken):
                got = mgr.restore(which)
            assert got.info.step == expect and same(got.state, expect)
            with pytest.raises(CorruptCheckpointError):
                mgr.restore(which, fallback=False)
            with pytest.raises(CorruptCheckpointError):
                mgr.restore(broken)
            trials["bit-rot cases: manager fell back with a warning"] += 1
        path.write_bytes(original)


def test_damaged_index_is_rebuilt_silently(ckdir: Path, trials: Counter[str]) -> None:
    index = ckdir / INDEX_NAME
    original = index.read_bytes()
    with CheckpointManager(ckdir, monitor="loss") as mgr:
        want, best = mgr.checkpoints, mgr.best
    for _, damaged in damages(original, None):
        index.write_bytes(damaged)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mgr = CheckpointManager(ckdir, monitor="loss")
            assert mgr.checkpoints == want and mgr.best == best
            assert same(mgr.restore("latest").state, 2)
        decode_framed(index.read_bytes(), INDEX_MAGIC, "rebuilt index")  # rewritten whole
        trials["damaged-index cases rebuilt silently"] += 1
