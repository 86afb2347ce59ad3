"""Loading and verifying a checkpoint: plan, read, check, assemble.

Everything read is untrusted: the manifest is validated field by field before any file is
opened (:func:`~checkpointer.manifest.read_manifest`), and each data file must agree with
it before its bytes are read (:mod:`checkpointer.reading`, the one read engine).

- plan: which tensors to read whole, which pieces of sharded arrays to read in part or
  straight into the requested boxes (:mod:`checkpointer.reshard`);
- read: the bytes, each tensor's checksum checked as it is read;
- check: the file checksums, and that the block checksums of pieces combine into theirs;
- assemble: pieces into arrays or requested boxes, then the tree.

:func:`verify_checkpoint` checks every checksum without keeping any data: its memory does
not grow with the checkpoint. A load that runs out of memory raises a CheckpointError saying
so (:func:`~checkpointer.reading.memory_guard`), never a ``MemoryError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO

from .errors import ChecksumMismatchError, ManifestError
from .format import HeaderEntry
from .gcpause import without_gc
from .manifest import MANIFEST_NAME, Manifest, TensorRow, read_manifest
from .reading import (
    allocate,
    check_block_sum,
    memory_guard,
    open_checked,
    read_rows,
    read_tensors,
    verify_file,
)
from .reshard import BoxReads, pieces_needed, plan_box_reads, resolve_pieces
from .sharding import ShardSpec
from .storage import Store
from .tree import unflatten

__all__ = ["load_checkpoint", "verify_checkpoint"]


@dataclass(frozen=True)
class _Plan:
    """What to read of each file (see :func:`_plan`)."""

    boxes: BoxReads
    rows: dict[str, tuple[int, int]]  # pieces read in part: (first row, end row)
    whole: set[str] | None  # tensors read whole (None: all but the partial ones)
    verify: bool

    @property
    def partial(self) -> set[str]:
        return self.rows.keys() | self.boxes.direct.keys()


@without_gc
def load_checkpoint(store: Store, name: str, *, verify: bool = True,
                    specs: dict[str, ShardSpec] | None = None) -> tuple[Any, Manifest]:
    """Read checkpoint ``name``: ``(tree, manifest)``. Verifies every checksum unless told not to.

    Sharded arrays come back whole, except those whose tree key is in ``specs``: those come
    back as :class:`~checkpointer.sharding.ShardedArray` holding just the requested boxes,
    and only the stored pieces overlapping them are read.
    """
    with memory_guard(f"load {store.url_of(name)}"):
        manifest = read_manifest(store, name)
        plan = _plan(manifest, specs or {}, verify)
        arrays = _read(store, name, manifest, plan)
        if verify:
            _check_blocks(store, name, manifest, arrays, plan)
        arrays = resolve_pieces(manifest, arrays, specs or {}, plan.boxes, plan.rows)
        try:
            return unflatten(manifest.tree, arrays), manifest
        except ManifestError as exc:
            raise ManifestError(f"{store.url_of(name)}/{MANIFEST_NAME}: {exc}") from None


def _plan(manifest: Manifest, specs: dict[str, ShardSpec], verify: bool) -> _Plan:
    """Pieces whose rows fill whole rows of the requested boxes are read straight into them;
    of the other pieces needed in part only their rows are read. Both read just the bytes
    needed, widened to whole blocks to verify them block by block (a piece too small to
    have blocks is read whole to verify it); with verify=False just the bytes needed."""
    boxes = plan_box_reads(manifest, specs)
    blocked = {t.key for t in manifest.tensors if t.blocks}
    rows = {k: r for k, r in boxes.rows.items() if k in blocked or not verify}
    wanted = pieces_needed(manifest, specs)
    whole = None if wanted is None else wanted - rows.keys() - boxes.direct.keys()
    return _Plan(boxes, rows, whole, verify)


def _read(store: Store, name: str, manifest: Manifest, plan: _Plan) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for file, expected in zip(manifest.files, manifest.by_file().values(), strict=True):
        rel = f"{name}/{file.name}"
        where = store.url_of(rel)
        if plan.whole is None or plan.whole & expected.keys():
            with open_checked(store, rel, file, expected) as (f, entries, head_crc):
                crcs = {k: t.crc32c for k, t in expected.items()} if plan.verify else None
                if plan.whole is not None and not expected.keys() <= plan.whole:
                    arrays.update(read_tensors(f, [e for e in entries if e.key in plan.whole],
                                               crcs, where, head_crc)[0])
                else:
                    got, file_crc = read_tensors(f, entries, crcs, where, head_crc)
                    if plan.verify and file_crc != file.crc32c:
                        raise ChecksumMismatchError(f"{where}: file checksum does not match")
                    arrays.update(got)
        if plan.partial & expected.keys():
            with open_checked(store, rel, file, expected) as (f, entries, _):
                for e in entries:
                    if e.key in plan.partial:
                        arrays.update(_read_part(f, where, e, expected[e.key], manifest, plan))
    return arrays


def _read_part(f: BinaryIO, where: str, e: HeaderEntry, row: TensorRow, manifest: Manifest, plan: _Plan
               ) -> dict[str, Any]:
    """One piece needed in part: into a buffer of its rows, or straight into the boxes."""
    check: tuple[int, tuple[int, ...]] | int | None = None
    if plan.verify:
        check = (manifest.block_bytes, row.blocks) if row.blocks and manifest.block_bytes else row.crc32c
    if e.key not in plan.rows:
        read_rows(f, where, e, plan.boxes.direct[e.key], check)
        return {}
    first, end = plan.rows[e.key]
    out = allocate((end - first, *e.shape[1:]), e.dtype, where, f"rows of {e.key!r:.80}")
    read_rows(f, where, e, [(first, end, out)], check)  # copied into the boxes later
    return {e.key: out}


def _check_blocks(store: Store, name: str, manifest: Manifest, arrays: dict[str, Any],
                  plan: _Plan) -> None:
    """The block checksums of the pieces read whole must agree with their own checksum."""
    where = f"{store.url_of(name)}/{MANIFEST_NAME}"
    for t in manifest.tensors:
        if t.blocks and t.key in arrays and t.key not in plan.rows and manifest.block_bytes:
            check_block_sum(t, manifest.block_bytes, where)


def verify_checkpoint(store: Store, name: str) -> Manifest:
    """Check every checksum of checkpoint ``name`` in bounded memory; return its manifest.

    Raises:
        CorruptCheckpointError: (a subclass of) the first problem found, naming the file.
        CheckpointError: not enough memory for the manifest (its data is streamed).
    """
    with memory_guard(f"verify {store.url_of(name)}"):
        return _verify(store, name)


def _verify(store: Store, name: str) -> Manifest:
    manifest = read_manifest(store, name)
    for file, expected in zip(manifest.files, manifest.by_file().values(), strict=True):
        rel = f"{name}/{file.name}"
        with open_checked(store, rel, file, expected) as (f, entries, head_crc):
            got = verify_file(f, entries, expected, store.url_of(rel), head_crc, manifest.block_bytes)
        if got != file.crc32c:
            raise ChecksumMismatchError(f"{store.url_of(rel)}: file checksum does not match")
    stored = {t.key for t in manifest.tensors} | {s.key for s in manifest.shards}
    try:  # the skeleton names only arrays that exist
        unflatten(manifest.tree, {k: None for k in stored})  # type: ignore[misc]
    except ManifestError as exc:
        raise ManifestError(f"{store.url_of(name)}/{MANIFEST_NAME}: {exc}") from None
    return manifest
