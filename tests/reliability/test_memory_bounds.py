"""Memory bounds of the read side: decoding bounded by the input's size, reading by what is asked.

- Manifests (framed msgpack) and safetensors headers (JSON) are decoded only when their
  objects fit a budget proportional to their size. Hostile 32 MiB documents of tiny
  containers are refused before anything is built: the peak RSS of a child process grows
  by a few times the input, not the 74 times it did. The estimates behind the budgets are
  upper bounds of what decoding really allocates (tracemalloc), and real documents pass.
- Reads stream, or allocate just the tensor asked for: a 256 MiB sparse checkpoint verifies
  (library and ``checkpointer verify``) under an address-space limit of 128 MiB above the
  interpreter's, while reading its big tensor under that limit fails with a
  CheckpointError naming the memory, never a MemoryError traceback.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from _hostile import frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpointer
from checkpointer import format as fmt
from checkpointer.checksum import crc32c
from checkpointer.frame import (
    FRAME_BYTES,
    MEMORY_PER_BYTE,
    decoded_bytes,
    memory_budget,
    memory_needed,
)
from checkpointer.manifest import MANIFEST_NAME, FileRow, TensorRow, read_manifest
from checkpointer.storage import open_store

MIB = 1 << 20
HOSTILE = 32 * MIB
_CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}

# The child: imports done, an optional address-space limit (``headroom`` bytes above what
# the interpreter has mapped), then ``record(name, fn)`` for each case; it prints, per case,
# the outcome (the CheckpointError's class, "MemoryError", or "ok"), the message, the return
# value and the peak RSS after the case.
_PRELUDE = textwrap.dedent('''
    import json, resource
    import numpy as np
    import checkpointer
    from checkpointer import CheckpointError

    def _status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def _vm():  # address space mapped now
        return _status("VmSize:")

    def _peak():  # peak RSS of this process (ru_maxrss would carry the forking parent's over exec)
        return _status("VmHWM:")

    RESULTS = {"base": 0, "cases": {}}

    def record(name, fn):
        try:
            value, outcome, message = fn(), "ok", ""
        except CheckpointError as exc:
            value, outcome, message = None, type(exc).__name__, str(exc)
        except MemoryError as exc:
            value, outcome, message = None, "MemoryError", repr(exc)
        RESULTS["cases"][name] = {"outcome": outcome, "message": message, "value": value, "peak": _peak()}

    def limit(headroom):
        resource.setrlimit(resource.RLIMIT_AS, (_vm() + headroom, resource.RLIM_INFINITY))
''')


def run_child(body: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``body`` after the prelude in a fresh interpreter; its results."""
    code = _PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(RESULTS))\n"
    env = {**{k: v for k, v in os.environ.items() if k.startswith("PYTHON")}, **_CHILD_ENV}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# -- 5. hostile documents: refused before they are built ------------------------------------

def _array32(count: int, items: bytes) -> bytes:
    return b"\xdd" + struct.pack(">I", count) + items


def _hostile_bodies() -> dict[str, bytes]:
    """32 MiB msgpack bodies whose objects would take 42 to 82 times their size."""
    nested = b"\x91" * 1000 + b"\xc0"
    return {
        "empty maps": _array32(HOSTILE, b"\x80" * HOSTILE),
        "empty lists": _array32(HOSTILE, b"\x90" * HOSTILE),
        "negative ints": _array32(HOSTILE, b"\xe0" * HOSTILE),
        "one-entry maps": _array32(HOSTILE // 3, b"\x81\xa0\xc0" * (HOSTILE // 3)),
        "nested lists": _array32(HOSTILE // len(nested), nested * (HOSTILE // len(nested))),
    }


def _distinct_keys(count: int) -> bytes:
    """``"%08x":{},`` for 0 <= i < count, built at numpy speed."""
    rows = np.frombuffer(b'"00000000":{},' * count, np.uint8).reshape(count, 14).copy()
    digits = np.arange(count, dtype=np.uint32)[:, None] >> np.arange(28, -1, -4, dtype=np.uint32) & 15
    rows[:, 1:9] = np.frombuffer(b"0123456789abcdef", np.uint8)[digits]
    return rows.tobytes()[:-1]


def _hostile_headers() -> dict[str, bytes]:
    """32 MiB JSON headers of tiny containers (json builds 21 to 26 bytes per byte)."""
    n = HOSTILE // 3
    keys = _distinct_keys(HOSTILE // 14)
    return {
        "list of empty objects": b"[" + b"{}," * n + b"{}]",
        "list of empty lists": b'{"a":[' + b"[]," * n + b"[]]}",
        "object of empty objects": b"{" + keys + b"}",
    }


def _write_hostile(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    manifests, headers = {}, {}
    for i, (name, body) in enumerate(_hostile_bodies().items()):
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / MANIFEST_NAME).write_bytes(frame(body))
        manifests[name] = str(tmp_path / f"c{i}")
    for i, (name, blob) in enumerate(_hostile_headers().items()):
        blob += b" " * (-len(blob) % 8)
        (tmp_path / f"h{i}.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
        headers[name] = str(tmp_path / f"h{i}.safetensors")
    return manifests, headers


def test_hostile_documents_are_refused_before_they_are_built(tmp_path: Path) -> None:
    manifests, headers = _write_hostile(tmp_path)
    out = run_child(f"""
        import os
        from checkpointer import format as fmt
        def parse(path):
            with open(path, "rb") as f:
                fmt.read_header(f, os.path.getsize(path), path)
        limit(1 << 30)  # without the bounds each case wants 0.7 to 2.6 GiB
        RESULTS["base"] = _peak()
        for name, path in {manifests!r}.items():
            record(name, lambda: checkpointer.load(path))
        record("open", lambda: checkpointer.open({manifests["empty maps"]!r}))
        for name, path in {headers!r}.items():
            record(name, lambda: parse(path))
    """)
    for name, case in out["cases"].items():
        assert case["outcome"] == ("HeaderError" if name in headers else "ManifestError"), (name, case)
        assert "bytes per byte" in case["message"], case
    grew = max(c["peak"] for c in out["cases"].values()) - out["base"]
    assert grew < 4 * HOSTILE, f"hostile documents grew the peak RSS by {grew >> 20} MiB"


def test_a_memory_shortage_while_decoding_is_a_checkpoint_error(tmp_path: Path) -> None:
    """Documents within their budget, decoded under a limit too small for them."""
    (tmp_path / "c").mkdir()  # 1.2 MB of ["n"] nodes (a tree of Nones): 30 MB of lists
    (tmp_path / "c" / MANIFEST_NAME).write_bytes(frame(msgpack.packb([["n"]] * 400_000)))
    blob = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}' % i
                            for i in range(100_000)) + b"}"  # 6 MB of header: 50 MB of objects
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    out = run_child(f"""
        import os
        from checkpointer import format as fmt
        header = {str(tmp_path / "h.safetensors")!r}
        def parse():
            with open(header, "rb") as f:
                fmt.read_header(f, os.path.getsize(header), header)
        limit(16 << 20)
        record("load", lambda: checkpointer.load({str(tmp_path / "c")!r}))
        record("header", parse)
    """)
    for name, case in out["cases"].items():
        assert case["outcome"] == "InsufficientMemoryError", (name, case)
        assert "not enough memory" in case["message"], case


# -- 5. the estimates: upper bounds of what decoding allocates, passed by real documents ----

_KEYS = [sys.intern(k) for k in ["a", "bb", "step", "metrics", "x" * 40, "ключ", "键值", "k😀"]]
_leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=40) | st.binary(max_size=40))
_docs = st.recursive(_leaves, lambda kids: st.lists(kids, max_size=12)
                     | st.dictionaries(st.sampled_from(_KEYS), kids, max_size=6), max_leaves=300)


_FIXED = 16 * 1024  # what a decoder allocates whatever the input (covered by the budgets' floor)


def _traced_peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_docs, repeat=st.integers(1, 50))
def test_the_msgpack_estimates_bound_what_decoding_allocates(doc: Any, repeat: int) -> None:
    body = msgpack.packb([doc] * repeat, use_bin_type=True)
    real = _traced_peak(lambda: _unpack(body)) - _FIXED
    assert decoded_bytes(body) >= real
    assert memory_needed(body, budget=1 << 62) >= real  # the byte histogram's bound


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_docs, repeat=st.integers(1, 50))
def test_the_json_estimate_bounds_what_parsing_allocates(doc: Any, repeat: int) -> None:
    blob = json.dumps({"k": [doc] * repeat, "n": doc}, default=lambda b: b.hex()).encode()
    hook = fmt._pairs_no_dupes("test")
    real = _traced_peak(lambda: json.loads(blob.decode(), object_pairs_hook=hook)) - _FIXED
    assert fmt.header_memory(blob) >= real


def _ten_thousand() -> dict[str, Any]:
    return {"model": {f"layer{i}": {"w": np.zeros(4, np.float32)} for i in range(10_000)}}


def _save(tmp_path: Path, state: Any) -> bytes:
    checkpointer.save(str(tmp_path / "c"), state)
    return (tmp_path / "c" / MANIFEST_NAME).read_bytes()[FRAME_BYTES:]


@pytest.mark.parametrize("name, state", [
    ("10,000 tensors", _ten_thousand()),
    ("short names", {f"w{i}": np.zeros(2, np.float32) for i in range(5_000)}),
    ("CJK names", {f"模型层{i}权重": np.zeros(2, np.float32) for i in range(2_000)}),
    ("a list of Nones", {"x": [None] * 50_000}),
    ("a list of ints", {"x": list(range(-20_000, 20_000)), "y": [2**40 + i for i in range(5_000)]}),
    ("empty lists", {"x": [[] for _ in range(30_000)]}),
    ("nested lists", {"x": [[[[[[]]]]] for _ in range(10_000)]}),
    ("a dict of strs", {"x": {f"k{i}": f"v{i}" * 3 for i in range(10_000)}}),
])
def test_real_documents_are_within_their_budget(tmp_path: Path, name: str, state: Any) -> None:
    body = _save(tmp_path, state)
    assert memory_needed(body, memory_budget(len(body))) <= memory_budget(len(body))
    real = _traced_peak(lambda: _unpack(body))
    assert real <= decoded_bytes(body) <= 1.6 * real + _FIXED  # an upper bound, and a close one
    assert checkpointer.load(str(tmp_path / "c")).keys() == state.keys()
    data = tmp_path / "c" / "data-00000.safetensors"
    raw = data.read_bytes() if data.exists() else b"\0" * 8
    blob = raw[8:8 + struct.unpack("<Q", raw[:8])[0]]
    if len(blob) > 4096:  # a header of tensors: within its budget without the floor
        assert fmt.header_memory(blob) <= fmt.HEADER_MEMORY_PER_BYTE * len(blob)


def test_a_real_manifest_passes_the_byte_histogram(tmp_path: Path) -> None:
    """The cheap bound (about 1 ms per MiB) suffices for real manifests: no token walk."""
    body = _save(tmp_path, _ten_thousand())
    assert memory_needed(body, budget=1 << 62) <= MEMORY_PER_BYTE * len(body)  # the floor unused


# -- 6. reads stream, or allocate only the tensor asked for ---------------------------------

def _sparse_checkpoint(path: Path, nbytes: int) -> None:
    """A valid checkpoint of a ``nbytes`` float32 zero tensor "big" (a hole in a sparse file)
    and a small tensor, written as the engine writes them."""
    checkpointer.save(str(path), {"big": np.zeros(1, np.float32), "small": np.arange(4, dtype=np.float32)})
    store = open_store(str(path.parent))
    m = read_manifest(store, path.name)
    small = np.arange(4, dtype=np.float32).tobytes()
    header = {"__metadata__": {"format": "pt"},
              "big": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]},
              "small": {"dtype": "F32", "shape": [4], "data_offsets": [nbytes, nbytes + 16]}}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    head = struct.pack("<Q", len(blob)) + blob
    zeros, crc_big = bytes(8 * MIB), 0
    for _ in range(nbytes // len(zeros)):
        crc_big = crc32c(zeros, crc_big)
    file = m.files[0]
    with open(path / file.name, "wb") as f:
        f.write(head)
        f.seek(len(head) + nbytes)
        f.write(small)
    base = len(head)
    rows = (TensorRow("big", file.name, "F32", (nbytes // 4,), base, base + nbytes, crc_big),
            TensorRow("small", file.name, "F32", (4,), base + nbytes, base + nbytes + 16, crc32c(small)))
    file_crc = crc32c(struct.pack("<2I", crc_big, rows[1].crc32c), crc32c(head))
    m = replace(m, files=(FileRow(file.name, base + nbytes + 16, file_crc),), tensors=rows)
    (path / MANIFEST_NAME).write_bytes(m.encode())


def test_a_sparse_checkpoint_verifies_under_a_memory_limit(tmp_path: Path) -> None:
    big = 256 * MIB
    path = tmp_path / "sparse"
    _sparse_checkpoint(path, big)
    assert (path / "data-00000.safetensors").stat().st_blocks * 512 < 4 * MIB  # sparse indeed
    out = run_child(f"""
        from checkpointer.cli import main
        from checkpointer.load import verify_checkpoint
        from checkpointer.storage import open_store
        path = {str(path)!r}
        limit(128 << 20)
        RESULTS["base"] = _peak()
        record("verify", lambda: verify_checkpoint(open_store({str(tmp_path)!r}), "sparse").nbytes)
        record("cli verify", lambda: main(["verify", path]))
        record("load", lambda: checkpointer.load(path))
        record("load unverified", lambda: checkpointer.load(path, verify=False))
        record("open: small", lambda: checkpointer.open(path).tensor("small").tolist())
        record("open: big", lambda: checkpointer.open(path).tensor("big"))
        record("open: state", lambda: checkpointer.open(path).state())
    """)
    cases = out["cases"]
    size = (path / "data-00000.safetensors").stat().st_size
    assert (cases["verify"]["outcome"], cases["verify"]["value"]) == ("ok", size), cases["verify"]
    assert (cases["cli verify"]["outcome"], cases["cli verify"]["value"]) == ("ok", 0), cases["cli verify"]
    assert cases["cli verify"]["peak"] - out["base"] < 64 * MIB  # two 8 MiB buffers, not 256 MiB
    assert (cases["open: small"]["outcome"], cases["open: small"]["value"]) == ("ok", [0.0, 1.0, 2.0, 3.0])
    for name in ("load", "load unverified", "open: big", "open: state"):
        assert cases[name]["outcome"] == "InsufficientMemoryError", (name, cases[name])
        assert "not enough memory" in cases[name]["message"] and str(big) in cases[name]["message"], cases[name]


def test_a_tensor_read_allocates_only_that_tensor(tmp_path: Path) -> None:
    sizes = {"a": 6 * MIB, "b": 1024, "c": 20 * MIB, "d": 100 * 1024, "e": 0}
    state = {k: np.full(n // 4, 7, np.float32) for k, n in sizes.items()}
    checkpointer.save(str(tmp_path / "c"), state)
    with checkpointer.open(str(tmp_path / "c")) as ckpt:
        for key, n in sizes.items():
            peak = _traced_peak(lambda: ckpt.tensor(key))  # noqa: B023 - called at once
            assert peak <= n + 64 * 1024, (key, n, peak)
            assert math.isclose(float(ckpt.tensor(key).sum()), 7.0 * (n // 4))
