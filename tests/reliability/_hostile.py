"""Helpers of the hostile-input tests: bounded-memory calls, framing, a valid manifest."""

from __future__ import annotations

import gc
import io
import json
import math
import struct
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

import checkpointer
from checkpointer import CheckpointError
from checkpointer import format as fmt
from checkpointer.checksum import crc32c
from checkpointer.dtypes import SAFETENSORS_TO_NUMPY
from checkpointer.frame import decode_framed
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME, read_manifest
from checkpointer.sharding import Shard, ShardedArray
from checkpointer.storage import open_store

MEMORY_CAP = 4 << 20  # bytes of Python allocation per case


@contextmanager
def bounded_memory() -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Yield ``run(fn, cap=MEMORY_CAP)``: calls ``fn`` under tracemalloc and asserts its peak
    stayed under ``cap`` (tracing only the call keeps hypothesis's own generation fast)."""

    def traced(fn: Callable[[], Any]) -> tuple[Any, int]:
        tracemalloc.start()
        try:
            return fn(), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def run(fn: Callable[[], Any], cap: int = MEMORY_CAP) -> Any:
        result, peak = traced(fn)
        if peak >= cap:
            # tracemalloc counts every thread, and a collection may run finalizers of earlier
            # tests' objects (an unclosed S3 file flushing its buffer) inside the window: run
            # the case again with no garbage pending. A loader that allocates without bound
            # on some input does it every time on that input.
            gc.collect()
            result, peak = traced(fn)
        assert peak < cap, f"case allocated {peak} bytes"
        return result

    yield run


def only_checkpoint_errors(fn: Callable[[], Any]) -> str:
    """``fn()``'s outcome: 'ok' or the name of the CheckpointError it raised."""
    try:
        fn()
    except CheckpointError as exc:
        assert str(exc)
        return type(exc).__name__
    return "ok"


def _valid_file() -> bytes:
    buf = io.BytesIO()
    fmt.write_safetensors(
        buf,
        "data-00000.safetensors",
        [
            ("a", np.arange(6, dtype=np.float32).reshape(2, 3)),
            ("b", np.zeros(3, np.int8)),
            ("c", np.ones((), np.float64)),
        ],
    )
    return buf.getvalue()


VALID = _valid_file()
HEADER_LEN = 8 + struct.unpack("<Q", VALID[:8])[0]


def parse_header(data: bytes) -> str:
    return only_checkpoint_errors(lambda: fmt.read_header(io.BytesIO(data), len(data), "fuzz"))


def framed_header(header: Any, tail: bytes, claim: int | None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if claim is None else claim) + blob + tail


def frame(body: bytes, magic: bytes = MANIFEST_MAGIC) -> bytes:
    return struct.pack("<8sIQ", magic, crc32c(body), len(body)) + body


def mutations(base: bytes, grow: int = 0) -> st.SearchStrategy[bytes]:
    """``base`` with a few bytes overwritten, inserted or deleted; with ``grow``, also ranges
    of up to ``grow`` bytes copied elsewhere (inputs several times ``base``'s size)."""
    kinds = ["set", "ins", "del", "copy"] if grow else ["set", "ins", "del"]
    edit = st.tuples(st.sampled_from(kinds), st.integers(0, len(base)),
                     st.binary(min_size=1, max_size=4), st.integers(0, len(base)), st.integers(1, max(grow, 1)))

    def apply(edits: list[tuple[str, int, bytes, int, int]]) -> bytes:
        out = bytearray(base)
        for kind, pos, blob, start, n in edits:
            pos = min(pos, len(out))
            if kind == "set":
                out[pos : pos + len(blob)] = blob
            elif kind == "ins":
                out[pos:pos] = blob
            elif kind == "del":
                del out[pos : pos + len(blob)]
            else:
                out[pos:pos] = out[start : start + n]
        return bytes(out)

    return st.lists(edit, min_size=1, max_size=8 if grow else 4).map(apply)


def noise(seed: int, size: int) -> bytes:
    """``size`` random bytes (hypothesis draws the seed: inputs far larger than its buffer)."""
    return np.random.default_rng(seed).bytes(size)


def noise_blobs(max_kib: int = 64) -> st.SearchStrategy[bytes]:
    """Random blobs of 0 to ``max_kib`` KiB, the sizes spread evenly over the range."""
    return st.builds(lambda seed, kib, extra: noise(seed, (kib << 10) + extra),
                     st.integers(0, 2**32 - 1), st.integers(0, max_kib), st.integers(0, 1023))


def good_manifest() -> dict[str, Any]:
    store = open_store(f"memory://hostile-{uuid.uuid4().hex[:8]}")
    url = store.url_of("c")
    checkpointer.save(url, {"x": np.arange(4.0), "y": [1, "s", None, (b"b",)]})
    read_manifest(store, "c")  # valid, as written
    body: dict[str, Any] = decode_framed(store.read_bytes(f"c/{MANIFEST_NAME}"), MANIFEST_MAGIC, url)
    return body  # the raw body, for attacks to edit


GOOD = good_manifest()


# -- real checkpoints with shards and block checksums, and edits of their manifests ----------

BLOCK = 4096  # the smallest block_bytes a manifest may declare: pieces of a few KiB get blocks
CONFUSIONS: tuple[Any, ...] = (
    None, True, False, 0, -1, 2**62, 2**64 - 1, -(2**63), 0.5, math.nan, math.inf, "", "../x",
    "a" * 300, "F32", b"", b"\x00\xff", [], [None], [0, -1], {}, {"k": 1}, [[[]]], [1, [2, ["x"]]],
)
INT_EDITS: tuple[Callable[[int], int], ...] = (
    lambda v: v + 1, lambda v: v - 1, lambda v: -v - 1, lambda v: 2 * v, lambda v: 0,
    lambda v: 2**62 - 1, lambda v: 2**62, lambda v: 2**64 - 1, lambda v: -(2**63),
)
Path_ = tuple[Any, ...]


def layered_state(groups: int, seed: int) -> dict[str, Any]:
    """Three sharded arrays (row pieces with 2 and 3 blocks each, a 2x2 grid of pieces too
    small for blocks, 1-D pieces one of them empty) and ``groups`` layers of 11 leaves: arrays
    of several dtypes (empty ones too), str, bytes, int, float, None, bool, numpy scalars and
    a big int in nested dicts, lists and tuples."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((96, 40)).astype(np.float32)
    grid = (np.arange(48, dtype=np.int16) * (seed + 1)).reshape(6, 8)
    vec = rng.integers(0, 255, 30, dtype=np.uint8)
    state: dict[str, Any] = {
        "emb": ShardedArray(emb.shape, emb.dtype, (Shard((0, 0), emb[:40]), Shard((40, 0), emb[40:]))),
        "grid": ShardedArray(grid.shape, grid.dtype, tuple(
            Shard((r, c), grid[r:r + 3, c:c + 4]) for r in (0, 3) for c in (0, 4))),
        "vec": ShardedArray(vec.shape, vec.dtype, (Shard((0,), vec[:12]), Shard((12,), vec[12:]),
                                                   Shard((30,), vec[30:]))),
        "layers": [],
    }
    dtypes = (np.float32, np.int8, np.float16, np.bool_, np.uint64, np.float64)
    for i in range(groups):
        state["layers"].append({
            "w": rng.standard_normal((3, 2)).astype(dtypes[i % len(dtypes)]),
            "b": np.arange(i % 4, dtype=np.int8), "name": f"layer{i}", "blob": bytes([i % 256]) * 3,
            "n": i - 3, "lr": 0.1 * i, "none": None, "on": bool(i % 2),
            "t": (np.float16(i), [2**70 + i, "x"]),
        })
    return state


def whole(tree: Any) -> Any:
    """``tree`` as a plain load returns it: sharded arrays assembled."""
    if isinstance(tree, ShardedArray):
        out = np.empty(tree.shape, tree.dtype)
        for s in tree.shards:
            out[tuple(slice(o, o + n) for o, n in zip(s.offsets, s.data.shape, strict=True))] = s.data
        return out
    if isinstance(tree, dict):
        return {k: whole(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(whole(v) for v in tree)
    return tree


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of two trees: types, order, dtypes, shapes and bytes (nan too)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (np.ndarray, np.generic)):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def paths(obj: Any, at: Path_ = ()) -> list[Path_]:
    """Every path into ``obj``'s dicts (by key) and lists (by index), depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out: list[Path_] = []
    for k, v in items:
        out.append((*at, k))
        out += paths(v, (*at, k))
    return out


def get_at(obj: Any, path: Path_) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def edited(obj: Any, path: Path_, op: Callable[[Any, Any], None]) -> Any:
    """A copy of ``obj`` (containers along ``path`` copied, the rest shared) on which
    ``op(parent, key)`` ran at ``path``'s last step; ``obj`` itself when ``path`` is gone."""
    if not path:
        return obj
    try:
        get_at(obj, path)
    except (KeyError, IndexError, TypeError):
        return obj
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    if len(path) == 1:
        op(copy, path[0])
    else:
        copy[path[0]] = edited(obj[path[0]], path[1:], op)
    return copy


def replaced(obj: Any, path: Path_, value: Any) -> Any:
    return edited(obj, path, lambda parent, k: parent.__setitem__(k, value))


def deleted(obj: Any, path: Path_) -> Any:
    return edited(obj, path, _delete)


def framed_body(body: Any) -> bytes | None:
    """``body`` framed with a correct checksum; None where msgpack cannot encode it."""
    try:
        return frame(msgpack.packb(body, use_bin_type=True))
    except (ValueError, TypeError, OverflowError):
        return None


def msgpack_trees(max_leaves: int) -> st.SearchStrategy[Any]:
    """Random msgpack-able nested values (str keys), up to ``max_leaves`` leaves."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                       st.text(max_size=12), st.binary(max_size=12), st.sampled_from(CONFUSIONS))
    return st.recursive(leaves, lambda kids: st.one_of(
        st.lists(kids, max_size=6), st.dictionaries(st.text(max_size=8), kids, max_size=6)),
        max_leaves=max_leaves)


Edit = tuple[str, Path_, Any]


def edit_strategy(body: dict[str, Any]) -> st.SearchStrategy[Edit]:
    """One edit of ``body``: a value of another type at any path (paths drawn field group
    by field group, so the rows are hit as often as the much larger tree), a deletion, a
    swap of two values, an out-of-range int, another dtype, a duplicated list item, a
    renamed dict key, or an edit that keeps the manifest self-consistent."""
    every = paths(body)
    groups: dict[str, list[Path_]] = {}
    for p in every:
        groups.setdefault(p[0] if p[0] in ("tree", "tensors", "files", "shards", "blocks") else "fields", []).append(p)
    anywhere = st.sampled_from(sorted(groups)).flatmap(lambda g: st.sampled_from(groups[g]))
    ints = [p for p in every if type(get_at(body, p)) is int]
    codes = sorted(SAFETENSORS_TO_NUMPY)
    dtypes = [p for p in every if get_at(body, p) in codes]
    items = [p for p in every if isinstance(p[-1], int)]
    keyed = [p for p in every if isinstance(p[-1], str)]
    names = sorted({p[-1] for p in keyed}) + ["", "zzz", "__metadata__"]
    return st.one_of(
        st.tuples(st.just("set"), anywhere, st.one_of(st.sampled_from(CONFUSIONS), msgpack_trees(8))),
        st.tuples(st.just("delete"), anywhere, st.none()),
        st.tuples(st.just("swap"), anywhere, anywhere),
        st.tuples(st.just("int"), st.sampled_from(ints), st.integers(0, len(INT_EDITS) - 1)),
        st.tuples(st.just("dtype"), st.sampled_from(dtypes), st.sampled_from(codes)),
        st.tuples(st.just("dup"), st.sampled_from(items), st.none()),
        st.tuples(st.just("rekey"), st.sampled_from(keyed), st.sampled_from(names)),
        st.sampled_from(consistent_edits(body)),
    )


def _reshapes(shape: list[int]) -> list[list[int]]:
    n = math.prod(shape)
    return [x for x in ([n], shape[::-1], [*shape, 1], [1, *shape]) if x != shape]


def consistent_edits(body: dict[str, Any]) -> list[Edit]:
    """Edits after which every rule of the schema still holds, yet the manifest describes
    other values: a row retyped to a dtype of the same item size or reshaped to the same
    element count, a row pointed at another tensor's bytes (crc included), two pieces' offsets
    or two tree references swapped, two block lists swapped. Here a reader that trusted the
    manifest alone would return wrong values without an error."""
    size = {code: dt.itemsize for code, dt in SAFETENSORS_TO_NUMPY.items()}
    rows = body["tensors"]
    out: list[Edit] = []
    for i, r in enumerate(rows):
        out += [("set", ("tensors", i, 2), c) for c in sorted(size) if c != r[2] and size[c] == size[r[2]]]
        out += [("set", ("tensors", i, 3), x) for x in _reshapes(r[3])]
        out += [("move", ("tensors", i), j) for j, q in enumerate(rows)
                if j != i and q[5] - q[4] == r[5] - r[4]]
    for s, shard in enumerate(body.get("shards", [])):
        out += [("swap", ("shards", s, 3, a, 1), ("shards", s, 3, b, 1))
                for a in range(len(shard[3])) for b in range(a + 1, len(shard[3]))]
    refs = [p for p in paths(body["tree"], ("tree",)) if get_at(body, p) == "a"]
    out += [("swap", (*a[:-1], 1), (*b[:-1], 1)) for a, b in zip(refs, refs[1:], strict=False)]
    blocks = sorted(body.get("blocks", {}))
    out += [("swap", ("blocks", a), ("blocks", b)) for a in blocks for b in blocks if a < b]
    return out


def _delete(parent: Any, k: Any) -> None:
    del parent[k]


def apply_edit(body: Any, edit: Edit) -> Any:
    """``body`` with ``edit`` applied (unchanged where an earlier edit removed its path)."""
    kind, path, arg = edit
    try:
        value = get_at(body, path)
    except (KeyError, IndexError, TypeError):
        return body
    if kind == "set" or kind == "dtype":
        return replaced(body, path, arg)
    if kind == "delete":
        return deleted(body, path)
    if kind == "int":
        return replaced(body, path, INT_EDITS[arg](value)) if type(value) is int else body
    if kind == "dup":
        return edited(body, path, lambda parent, k: parent.insert(k, parent[k]))
    if kind == "move":  # row ``path`` takes row ``arg``'s file, byte range and crc
        try:
            other = body["tensors"][arg]
            return replaced(body, path, [value[0], other[1], *value[2:4], *other[4:7]])
        except (KeyError, IndexError, TypeError):  # an earlier edit broke either row
            return body
    if kind == "rekey":
        return edited(body, path, lambda parent, k: parent.__setitem__(arg, parent.pop(k)))
    if path[:len(arg)] == arg or arg[:len(path)] == path:  # swap: neither inside the other
        return body
    try:
        other = get_at(body, arg)
    except (KeyError, IndexError, TypeError):
        return body
    return replaced(replaced(body, path, other), arg, value)
