"""Fuzzers of the shapes real checkpoints have: shards, block checksums, hundreds of leaves.

Each case edits the decoded manifest of a checkpoint the engine wrote (type confusion in any
field, deletions, duplicates, swaps, out-of-range ints), frames it with a correct checksum
and writes it as that folder's manifest; then every entry point runs on the folder:
``checkpointer.load`` (verified and not), ``checkpointer.open`` with ``tensor()`` of every
key, ``verify_checkpoint``, a ``CheckpointManager`` opened on the directory and its
``restore()`` (a good older checkpoint sits beside the edited one), and the CLI's ``ls``,
``inspect`` and ``verify``. Every outcome is a value or a ``CheckpointError``; the manager
always opens; values that come back are bit-exact: the saved ones, or, where an edit made
the manifest describe other stored bytes (a tree leaf moved, a range moved onto an equal
tensor), exactly those bytes. Larger raw inputs (up to 64 KiB, random msgpack trees as
manifest bodies) go through the frame decoder and a full load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from _hostile import (
    BLOCK,
    CONFUSIONS,
    Path_,
    apply_edit,
    bounded_memory,
    consistent_edits,
    deleted,
    edit_strategy,
    frame,
    framed_body,
    get_at,
    layered_state,
    msgpack_trees,
    mutations,
    noise_blobs,
    only_checkpoint_errors,
    paths,
    replaced,
    same,
    whole,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpointer
from checkpointer import (
    CheckpointError,
    CheckpointManager,
    CheckpointWarning,
    CorruptCheckpointError,
)
from checkpointer import format as fmt
from checkpointer.cli import main
from checkpointer.dtypes import SAFETENSORS_TO_NUMPY
from checkpointer.frame import FRAME_BYTES, decode_framed
from checkpointer.index import INDEX_NAME, entry_from_manifest
from checkpointer.load import verify_checkpoint
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME, Manifest, parse, read_manifest
from checkpointer.sharding import ShardedArray, piece_key
from checkpointer.storage import open_store
from checkpointer.tree import flatten, unflatten

COUNTS: Counter[str] = Counter()
BIG_CAP = 48 << 20  # verify reads through two 8 MiB buffers per file
# checkpointer.open(...).tensor(k) checks each file's header against the manifest on first
# use (see test_reader_refuses_a_row_that_disagrees_with_the_header), so the fuzzers check
# the dtype and shape of what it returns too.
READER_TRUSTS_ROW_DTYPE = False
# Confusions the schema accepts (none: a bool version was one, see test_a_bool_version_is_refused).
KNOWN_ACCEPTED: set[tuple[tuple[Any, ...], Any]] = set()


@dataclass(frozen=True)
class Base:
    """A directory of two checkpoints the engine wrote: ``name``, whose manifest the cases
    replace, and an older good one, ``fallback``."""

    directory: Path
    name: str
    fallback: str
    body: dict[str, Any]  # the manifest of ``name`` as written, decoded
    state: Any  # what a load of ``name`` returns
    fallback_state: Any
    by_range: dict[tuple[str, int, int], list[np.ndarray]]  # what each stored range holds
    paths: tuple[Path_, ...]
    manifest: Manifest  # ``body`` parsed


def build_base(directory: Path, groups: int) -> Base:
    with mock.patch.object(fmt, "BLOCK_BYTES", BLOCK), CheckpointManager(
            directory, max_file_bytes=8 << 10) as mgr:
        old, new = layered_state(groups, 0), layered_state(groups, 1)
        fallback = mgr.save(old, step=1, metrics={"loss": 1.0}).name
        name = mgr.save(new, step=2, metrics={"loss": 0.5}).name
    body = decode_framed((directory / name / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "base")
    stored: dict[str, np.ndarray] = {}
    for key, value in flatten(new)[1]:
        if isinstance(value, ShardedArray):
            stored.update((piece_key(key, s.offsets), s.data) for s in value.shards)
        else:
            stored[key] = value
    by_range: dict[tuple[str, int, int], list[np.ndarray]] = {}
    for row in body["tensors"]:
        by_range.setdefault((row[1], row[4], row[5]), []).append(stored[row[0]])
    assert body["shards"] and body["blocks"] and len(body["files"]) > 1
    return Base(directory, name, fallback, body, whole(new), whole(old), by_range,
                tuple(paths(body)), parse(body, "base"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Base]]:
    """Compact (every kind of field, 25 leaves) and 60, 200 and 500 leaves. On a RAM disk
    where there is one: the cases are about parsing, and the manager's index write fsyncs."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else \
        tmp_path_factory.mktemp("bases")
    try:
        yield {label: build_base(root / label, groups)
               for label, groups in (("compact", 2), ("60", 5), ("200", 18), ("500", 45))}
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_hang() -> Iterator[None]:
    """A hang fails the test instead of stalling the suite (each case has a deadline too)."""

    def hang(signum: int, frame: Any) -> None:
        raise Hang("a fuzz test ran for more than 300 s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(300)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Hang(BaseException):
    """Raised by the watchdog; a BaseException so that no ``except Exception`` swallows it."""


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    from _relcommon import _COUNTS

    _COUNTS.update(COUNTS)


# -- what a case must give: the oracle -------------------------------------------------------


def _stored(base: Base, file: str, begin: int, end: int, code: str, shape: tuple[int, ...]
            ) -> np.ndarray | None:
    """The array the data file's own header places at that range, if it has this dtype/shape."""
    for arr in base.by_range.get((file, begin, end), []):
        if arr.dtype == SAFETENSORS_TO_NUMPY[code] and arr.shape == shape:
            return arr
    return None


def expected_tree(base: Base, body: dict[str, Any]) -> Any:
    """What a load of a manifest the engine accepted must give: the saved state when the
    edit left the tree and the rows' ranges alone; else the tree it describes, built from
    the stored bytes its rows point at (an accepted row pointing at other bytes fails)."""
    m, original = parse(body, "oracle"), base.manifest
    rows = [(t.key, t.file, t.dtype, t.shape, t.begin, t.end) for t in m.tensors]
    if (m.tree == original.tree and m.shards == original.shards
            and rows == [(t.key, t.file, t.dtype, t.shape, t.begin, t.end) for t in original.tensors]):
        COUNTS["oracle: accepted values compared with the saved state"] += 1
        return base.state
    COUNTS["oracle: accepted values compared with the bytes the edit describes"] += 1
    lookup: dict[str, np.ndarray] = {}
    for key, file, code, shape, begin, end in rows:
        arr = _stored(base, file, begin, end, code, shape)
        assert arr is not None, f"accepted row {key!r} points at bytes that are not its tensor"
        lookup[key] = arr
    for s in m.shards:
        out = np.empty(s.shape, SAFETENSORS_TO_NUMPY[s.dtype])
        for p in s.pieces:
            out[tuple(slice(o, o + n) for o, n in zip(p.offsets, lookup[p.key].shape, strict=True))] = lookup[p.key]
        lookup[s.key] = out
    for p in (p for s in m.shards for p in s.pieces):
        lookup.pop(p.key, None)
    return unflatten(m.tree, lookup)


def _load(base: Base, body: dict[str, Any], verify: bool) -> None:
    got = checkpointer.load(base.directory / base.name, verify=verify)
    assert same(got, expected_tree(base, body)), "an accepted manifest loaded other values"


def _read_each(base: Base) -> Counter[str]:
    """``checkpointer.open`` and every key's ``tensor()``: the bytes of the range its row
    names, as the file's header types them."""
    outcomes: Counter[str] = Counter()
    with checkpointer.open(base.directory / base.name) as reader:
        rows = {t.key: t for t in reader.manifest.tensors}
        for key in reader.keys():
            def read(key: str = key) -> None:
                arr, t = reader.tensor(key), rows[key]
                if READER_TRUSTS_ROW_DTYPE:
                    ok = any(a.tobytes() == arr.tobytes()
                             for a in base.by_range.get((t.file, t.begin, t.end), [np.empty(0)]))
                else:
                    ok = same(arr, _stored(base, t.file, t.begin, t.end, t.dtype, t.shape))
                assert ok, f"tensor({key!r}) returned bytes its file does not hold there"
            outcomes[only_checkpoint_errors(read)] += 1
        outcomes["lazy state " + only_checkpoint_errors(lambda: reader.state(lazy=True))] += 1
    return outcomes


def _manager(base: Base, body: dict[str, Any]) -> str:
    """The manager opens (never raises), lists the good checkpoint, lists the edited one or
    warns that it skipped it, and restores one of them bit-exact."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("checkpointer")
    log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, CheckpointManager(
                base.directory, monitor="loss") as mgr:
            warnings.simplefilter("always")
            names = [c.name for c in mgr.checkpoints]
            assert base.fallback in names, names
            assert base.name in names or any(base.name in s for s in seen), seen
            mgr.best  # noqa: B018 - ranks the listed ones
            got = mgr.restore()
    finally:
        log.removeHandler(handler)
    for w in caught:
        if issubclass(w.category, CheckpointWarning):
            assert base.name in str(w.message)
    if got.info.name == base.fallback:
        assert same(got.state, base.fallback_state)
        return "fallback"
    assert got.info.name == base.name and same(got.state, expected_tree(base, body))
    return "restored"


def _cli(base: Base, verified: bool) -> None:
    """``ls`` lists the good checkpoint (exit 1 at most, for the broken one), ``inspect``
    shows or refuses the edited one, ``verify`` agrees with ``verify_checkpoint``: never a
    traceback."""
    ckpt = str(base.directory / base.name)
    for argv, allowed in ((["ls", str(base.directory)], {0} if verified else {0, 1}),
                          (["inspect", ckpt], {0, 2}), (["verify", ckpt], {0 if verified else 1})):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = main(argv)
        assert rc in allowed and "Traceback" not in out.getvalue(), (argv, rc, out.getvalue())
        assert argv[0] != "ls" or base.fallback in out.getvalue()


def put_manifest(base: Base, blob: bytes, keep_index: bool) -> None:
    """Rewrite the manifest (its stamp changes with its size or mtime; where neither does,
    a kept index row is believed and restore falls back: an outcome as valid as any), and
    drop the index unless told to keep it."""
    (base.directory / base.name / MANIFEST_NAME).write_bytes(blob)
    if not keep_index:
        with contextlib.suppress(FileNotFoundError):
            (base.directory / INDEX_NAME).unlink()


def run_case(base: Base, body: Any, what: str, *, keep_index: bool, everything: bool | None = True
             ) -> dict[str, str] | None:
    """The entry points on the folder whose manifest is ``body``: their outcomes. The
    direct calls always; the manager and the CLI when ``everything``, or (``None``) when
    ``read_manifest`` accepts the manifest (they meet the same error where it refuses it)."""
    blob = framed_body(body)
    if blob is None:
        return None
    put_manifest(base, blob, keep_index)
    store = open_store(base.directory)
    out = {"manifest": only_checkpoint_errors(lambda: read_manifest(store, base.name))}
    with bounded_memory() as run:  # what allocates as the manifest says: the loads and reads
        out["load"] = run(lambda: only_checkpoint_errors(lambda: _load(base, body, True)))
        out["open"] = run(lambda: only_checkpoint_errors(lambda: COUNTS.update(
            {f"{what}: tensor() {k}": n for k, n in _read_each(base).items()})))
        out["verify"] = run(lambda: only_checkpoint_errors(
            lambda: verify_checkpoint(store, base.name)), BIG_CAP)
    out["load unverified"] = only_checkpoint_errors(lambda: _load(base, body, False))
    if out["manifest"] != "ok":
        assert set(out.values()) == {out["manifest"]}, out
    assert (out["load"] == "ok") == (out["verify"] == "ok"), out
    if everything or (everything is None and out["manifest"] == "ok"):
        out["manager"] = _manager(base, body)
        _cli(base, out["verify"] == "ok")
        COUNTS[f"{what}: manager and CLI runs"] += 1
    COUNTS[f"{what}: cases"] += 1
    COUNTS[f"{what}: load {'accepted' if out['load'] == 'ok' else 'refused'}"] += 1
    return out


# -- the fuzzers ---------------------------------------------------------------------------

FUZZ = settings(max_examples=100, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
EDITS: tuple[Any, ...] = (*CONFUSIONS, "delete")


def test_type_confusion_in_every_field_refused_or_harmless(bases: dict[str, Base]) -> None:
    """Every path of a manifest holding every kind of field (top-level fields, each position
    of each file, tensor, shard and piece row, each block list, each tree node) replaced by a
    value of each other type, and deleted: the schema and the tree builder refuse it with a
    CheckpointError or accept it, never anything else; a value of another type anywhere in
    the typed parts (all but the writer's free-form fields) is refused."""
    base = bases["compact"]
    store = open_store(base.directory)
    typed = {"format", "version", "files", "tensors", "shards", "block_bytes", "blocks", "tree"}
    for path in base.paths:
        for edit in EDITS:
            body = deleted(base.body, path) if edit == "delete" else replaced(base.body, path, edit)

            def check(body: Any = body) -> None:
                m = parse(decode_framed(framed_body(body) or b"", MANIFEST_MAGIC, "sweep"), "sweep")
                unflatten(m.tree, {k: None for k in [t.key for t in m.tensors] + [s.key for s in m.shards]})
                entry_from_manifest(store, base.name, m, 0)

            outcome = only_checkpoint_errors(check)
            COUNTS[f"shapes: field x type (schema, tree): {'accepted' if outcome == 'ok' else 'refused'}"] += 1
            if path[0] in typed and edit != "delete" and type(edit) is not type(get_at(base.body, path)):
                assert outcome != "ok" or (path, edit) in KNOWN_ACCEPTED, (path, edit)


def test_every_field_edited_through_every_entry_point(bases: dict[str, Base]) -> None:
    """Each path of the same manifest edited once (the edit rotating through the types and a
    deletion), written with a correct checksum, through every entry point."""
    base = bases["compact"]
    for i, path in enumerate(base.paths):
        edit = EDITS[i % len(EDITS)]
        body = deleted(base.body, path) if edit == "delete" else replaced(base.body, path, edit)
        # The manager and the CLI: on one edit in 4, and on every other one the manifest
        # schema accepts but of the tree (whose nodes only the tree builder reads, and the
        # loads and verify have run it).
        run_case(base, body, "shapes: every field, every entry point", keep_index=i % 2 == 0,
                 everything=True if i % 4 == 0 else None if path[0] != "tree" else False)


def test_fuzz_edited_manifests_of_large_sharded_checkpoints(bases: dict[str, Base]) -> None:
    """One to three edits of the manifest of a sharded checkpoint with blocks and 60, 200 or
    500 leaves, through every entry point."""
    strategies = {label: edit_strategy(b.body) for label, b in bases.items()}

    @FUZZ
    @given(st.data(), st.sampled_from(["60", "200", "500"]), st.booleans())
    def case(data: st.DataObject, label: str, keep_index: bool) -> None:
        base = bases[label]
        body: Any = base.body
        for edit in data.draw(st.lists(strategies[label], min_size=1, max_size=3), label="edits"):
            body = apply_edit(body, edit)
        run_case(base, body, "shapes: edited large manifests", keep_index=keep_index, everything=None)

    case()


def test_self_consistent_edits_give_the_bytes_they_describe_or_fail(bases: dict[str, Base]) -> None:
    """Every edit of the compact manifest that keeps the schema's rules (a row retyped or
    reshaped to the same size, pointed at another tensor's bytes, pieces' offsets, tree
    references or block lists swapped): refused, or exactly the stored bytes it describes."""
    base = bases["compact"]
    for i, edit in enumerate(consistent_edits(base.body)):
        run_case(base, apply_edit(base.body, edit), "shapes: self-consistent edits",
                 keep_index=i % 2 == 0, everything=i % 4 == 0)


@pytest.mark.parametrize("position, value", [(2, "I32"), (3, [6])], ids=["dtype", "shape"])
def test_reader_refuses_a_row_that_disagrees_with_the_header(tmp_path: Path, position: int,
                                                            value: Any) -> None:
    ckpt = tmp_path / "c"
    checkpointer.save(ckpt, {"w": np.arange(6, dtype=np.float32).reshape(3, 2)})
    body = decode_framed((ckpt / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    body["tensors"][0][position] = value
    (ckpt / MANIFEST_NAME).write_bytes(framed_body(body) or b"")
    with pytest.raises(CorruptCheckpointError), checkpointer.open(ckpt) as reader:
        reader.tensor("w")


def test_a_bool_version_is_refused(bases: dict[str, Base]) -> None:
    with pytest.raises(CorruptCheckpointError):
        parse({**bases["compact"].body, "version": True}, "t")


def raw_manifests(body: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Manifest files up to 64 KiB and more: noise, framed noise, the real manifest with its
    bytes edited (refused by the checksum) or its body's bytes edited and framed again (so the
    decoder and the schema see them), random msgpack trees as bodies, and the real body with
    one field replaced by a random tree or by copies of the tree (decodable bodies of 60 KiB)."""
    blob = framed_body(body) or b""
    packed = blob[FRAME_BYTES:]
    return st.one_of(
        noise_blobs(),
        noise_blobs().map(frame),
        mutations(blob, grow=8 << 10),
        mutations(packed, grow=8 << 10).map(frame),
        msgpack_trees(400).map(lambda tree: framed_body(tree) or b""),
        st.builds(lambda k, tree: framed_body({**body, k: tree}) or b"",
                  st.sampled_from(sorted(body)), msgpack_trees(200)),
        st.builds(lambda k, n: framed_body({**body, k: [body["tree"]] * n}) or b"",
                  st.sampled_from(sorted(body)), st.integers(1, 10)),
    )


def test_fuzz_large_raw_manifests(bases: dict[str, Base]) -> None:
    """Raw manifest files beside the data of the 200-leaf checkpoint: a decodable body goes
    through every entry point and the oracle; an undecodable one must be refused by each."""
    base = bases["200"]
    store = open_store(base.directory)

    @settings(FUZZ, max_examples=150)
    @given(raw_manifests(base.body), st.booleans())
    def case(blob: bytes, keep_index: bool) -> None:
        COUNTS["shapes: large raw manifests: over 16 KiB"] += len(blob) > 16 << 10
        try:
            body = decode_framed(blob, MANIFEST_MAGIC, "fuzz")
        except CheckpointError:
            put_manifest(base, blob, keep_index)
            with bounded_memory() as run:
                for fn in (lambda: checkpointer.load(base.directory / base.name),
                           lambda: checkpointer.open(base.directory / base.name),
                           lambda: verify_checkpoint(store, base.name)):
                    assert run(lambda fn=fn: only_checkpoint_errors(fn)) != "ok"
            COUNTS["shapes: large raw manifests: undecodable"] += 1
            return
        run_case(base, body, "shapes: large raw manifests", keep_index=keep_index, everything=None)

    case()
