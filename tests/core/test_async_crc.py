"""The I/O fast paths' helper threads: checksums overlapped with reads, fsync with checksums."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import errors, localio, reading
from checkpointer.checksum import crc32c


@pytest.fixture
def small_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipeline tensors from 64 KiB in 16 KiB chunks so small test files take that path."""
    monkeypatch.setattr(reading, "_PIPELINE", 64 << 10)
    monkeypatch.setattr(reading, "_PIPE_CHUNK", 16 << 10)


def _state() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    return {
        "big": rng.standard_normal(100_003, dtype=np.float32),
        "mid": rng.integers(0, 255, 70_000, dtype=np.uint8),
        "small": np.arange(10, dtype=np.int16),
        "view": np.arange(60_000.0)[::2],
    }


def test_pipelined_load_round_trips(tmp_path: Path, small_pipeline: None) -> None:
    state = _state()
    checkpointer.save(tmp_path / "c", state)
    back = checkpointer.load(tmp_path / "c")
    for k, v in state.items():
        assert back[k].tobytes() == np.ascontiguousarray(v).tobytes(), k


@pytest.mark.parametrize("where", ["big-first", "big-last", "mid", "header"])
def test_damage_detected_in_pipelined_chunks(
    tmp_path: Path, small_pipeline: None, where: str
) -> None:
    checkpointer.save(tmp_path / "c", _state())
    data = next((tmp_path / "c").glob("*.safetensors"))
    blob = bytearray(data.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    with _open(tmp_path / "c") as r:
        t = {x.key: x for x in r.manifest.tensors}
    pos = {
        "big-first": t["big"][4],
        "big-last": t["big"][5] - 1,
        "mid": (t["mid"][4] + t["mid"][5]) // 2,
        "header": blob.index(b'"pt"', 8, 8 + n) + 2,
    }[where]  # header: metadata 'pt' -> 'pu', still valid JSON
    blob[pos] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(errors.CorruptCheckpointError):
        checkpointer.load(tmp_path / "c")
    if where == "header":
        checkpointer.load(tmp_path / "c", verify=False)  # only the checksum noticed


def _open(path: Path) -> Any:
    from checkpointer.reader import open as ck_open

    return ck_open(path)


def test_file_checksum_chains_header_and_tensor_crcs(tmp_path: Path) -> None:
    checkpointer.save(tmp_path / "c", _state())
    with _open(tmp_path / "c") as r:
        ((fname, nbytes, crc),) = r.manifest.files
        tensors = sorted(r.manifest.tensors, key=lambda x: x.begin)
    blob = (tmp_path / "c" / fname).read_bytes()
    head = blob[: tensors[0][4]]
    assert len(blob) == nbytes
    want = crc32c(struct.pack(f"<{len(tensors)}I", *(x[6] for x in tensors)), crc32c(head))
    assert crc == want
    for x in tensors:
        assert crc32c(blob[x[4] : x[5]]) == x[6]


_FORK_SCRIPT = """
import os, sys
import numpy as np
import checkpointer
from checkpointer import reading
reading._PIPELINE, reading._PIPE_CHUNK = 64 << 10, 16 << 10
path = sys.argv[1]
state = {"big": np.arange(100_003, dtype=np.float32)}
checkpointer.save(path, state)
checkpointer.load(path)  # starts the checksum helper thread in this process
pid = os.fork()
if pid == 0:
    code = 1
    try:
        code = 0 if np.array_equal(checkpointer.load(path)["big"], state["big"]) else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_load_in_a_forked_child_after_the_helper_started(tmp_path: Path) -> None:
    # A fresh interpreter: forking this test process (which may hold JAX's threads) could hang.
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_background_fsync_failure_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer.save(tmp_path / "c", {"a": np.zeros(3)})
    real = os.fsync
    calls = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(errors.StorageError, match="Input/output"):
        checkpointer.save(tmp_path / "c", {"a": np.ones(1 << 16)})
    monkeypatch.setattr(os, "fsync", real)
    assert calls
    np.testing.assert_array_equal(checkpointer.load(tmp_path / "c")["a"], np.zeros(3))
    assert [p for p in os.listdir(tmp_path) if p != "c"] == []


def test_writer_syncs_again_after_late_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    w = localio.LocalWriter(str(tmp_path / "f"))
    w.write(b"abc")
    w.start_sync()
    w.write(b"def")
    w.close()
    assert (tmp_path / "f").read_bytes() == b"abcdef"
    assert len(synced) == 2


_ATEXIT = """
import atexit, sys
import numpy as np
import checkpointer
from checkpointer import reading
reading._PIPELINE, reading._PIPE_CHUNK = 1 << 16, 1 << 14
checkpointer.save(sys.argv[1], {"w": np.arange(100_000, dtype=np.float32)})
checkpointer.load(sys.argv[1])  # the helper thread exists before shutdown

def at_exit():  # runs after concurrent.futures refuses new work
    checkpointer.save(sys.argv[1], {"w": np.arange(100_000, dtype=np.float32)})
    back = checkpointer.load(sys.argv[1])
    print("ok" if back["w"][-1] == 99_999 else "bad", flush=True)

atexit.register(at_exit)
"""


def test_save_and_load_from_an_atexit_handler(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _ATEXIT, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stderr
