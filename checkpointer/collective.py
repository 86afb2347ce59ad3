"""One save written by several ranks, committed once.

The fixed sequence of collectives (every rank takes part in each, whatever fails):

1. broadcast from rank 0: the staging folder and file prefix (or rank 0's error);
2. gather to rank 0: each rank's data-file and piece records, written and fsynced
   (or that rank's error);
3. broadcast from rank 0: the outcome (the new list of checkpoints, or the error).

Rank 0 writes the manifest between 2 and 3, so it appears only after every rank's data
is durable; any rank's failure means no checkpoint and the same error on every rank (of the
same class of :mod:`checkpointer.errors`, see :func:`~checkpointer.distributed.raised_elsewhere`).

:class:`RankedSave` is one such save as one rank runs it: now (:meth:`RankedSave.run`), or
from the rank's writer thread (:func:`save_in_background`, after every rank has staged its
part: one more gather and broadcast, on the training thread's coordinator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .commit import Participants, write_rank_files
from .distributed import Coordinator, failure, pack, raised_elsewhere, run_on_primary, unpack
from .info import CheckpointInfo
from .manifest import FileRow, Piece, TensorRow
from .sharding import ShardedArray, split_pieces
from .storage import Store
from .tree import flatten, resolve_state

__all__ = ["primary_save", "follower_save", "agree", "RankPart", "RankedSave", "save_in_background",
           "rank_part", "on_every_rank"]

log = logging.getLogger("checkpointer")


def _rank_reply(files: list[FileRow], tensors: list[TensorRow], pieces: list[Piece]) -> dict[str, Any]:
    """One rank's written rows, as sent to rank 0 (the manifest's own row encodings)."""
    return {"ok": True, "files": [f.encode() for f in files], "tensors": [t.encode() for t in tensors],
            "pieces": [p.encode() for p in pieces], "blocks": {t.key: list(t.blocks) for t in tensors if t.blocks}}


def _rank_rows(reply: dict[str, Any]) -> tuple[list[FileRow], list[TensorRow], list[Piece]]:
    """The rows of :func:`_rank_reply` back as typed rows."""
    blocks = reply.get("blocks", {})
    files = [FileRow.decode(row) for row in reply["files"]]
    tensors = [TensorRow.decode(row, blocks) for row in reply["tensors"]]
    return files, tensors, [Piece.decode(row) for row in reply["pieces"]]


class _Primary(Participants):
    """Rank 0's side of steps 1 and 2, driven by the commit protocol's hooks."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord, self.step = coord, 0

    def staged(self, folder: str, prefix: str) -> None:
        self.coord.broadcast_bytes(pack({"ok": True, "folder": folder, "prefix": prefix}))
        self.step = 1

    def collect(self, files: list[FileRow], tensors: list[TensorRow], pieces: list[Piece]
                ) -> tuple[list[FileRow], list[TensorRow], list[Piece]]:
        replies = self.coord.gather_bytes(pack({"ok": True}))
        self.step = 2
        assert replies is not None
        for rank, raw in enumerate(replies[1:], start=1):
            reply = unpack(raw)
            if not reply.get("ok"):
                raise raised_elsewhere(reply, f"rank {rank} failed to write its part")
            their_files, their_tensors, their_pieces = _rank_rows(reply)
            files, tensors, pieces = files + their_files, tensors + their_tensors, pieces + their_pieces
        return files, tensors, pieces


def primary_save(coord: Coordinator, write: Callable[[Participants], CheckpointInfo],
                 entries: Callable[[], Any]) -> CheckpointInfo:
    """Rank 0: run ``write`` (the manager's commit) with the other ranks taking part."""
    part = _Primary(coord)
    try:
        info = write(part)
    except BaseException as exc:
        error = pack(failure(exc))
        if part.step == 0:
            coord.broadcast_bytes(error)
            raise
        if part.step == 1:
            coord.gather_bytes(pack({"ok": False}))
        coord.broadcast_bytes(error)
        raise
    coord.broadcast_bytes(pack({"ok": True, "entries": entries()}))
    return info


def follower_save(coord: Coordinator, store: Store, arrays: Sequence[tuple[str, Any]],
                  max_file_bytes: int, error: BaseException | None = None) -> Any:
    """Ranks > 0: write this rank's pieces where rank 0 says; return rank 0's entries.

    ``error``: this rank could not prepare its state; it still takes part in every step
    and reports the error, so that the save fails on every rank instead of hanging.
    """
    where = unpack(coord.broadcast_bytes(None))
    if not where.get("ok"):
        raise raised_elsewhere(where, "rank 0 failed")
    try:
        if error is not None:
            raise error
        _, pieces, meta = split_pieces(arrays, primary=False)
        files: list[FileRow] = []
        tensors: list[TensorRow] = []
        if pieces:
            files, tensors = write_rank_files(store, where["folder"], f"{where['prefix']}r{coord.rank:05d}-",
                                              pieces, max_file_bytes)
        reply = _rank_reply(files, tensors, meta)
    except BaseException as exc:  # an interrupt too: reported, then raised below
        reply = failure(exc)
    coord.gather_bytes(pack(reply))
    outcome = unpack(coord.broadcast_bytes(None))
    if error is not None:
        raise error
    if not reply["ok"]:
        raise raised_elsewhere(reply, f"rank {coord.rank} failed to write its part")
    if not outcome.get("ok"):
        raise raised_elsewhere(outcome, "rank 0 failed")
    return outcome["entries"]


def agree(coord: Coordinator, error: BaseException | None) -> BaseException | None:
    """Every rank's view of a collective step: ``None`` only when no rank failed, else this
    rank's own ``error``, or (on a rank that did not fail) the failure of the first rank that
    did, of its class, with every failed rank's message."""
    replies = coord.gather_bytes(pack({"ok": True} if error is None else failure(error)))
    verdict: dict[str, Any] = {"ok": True}
    if replies is not None:
        failed = [(rank, m) for rank, m in enumerate(map(unpack, replies)) if not m.get("ok")]
        if failed:
            verdict = {"ok": False, "type": failed[0][1].get("type"),
                       "error": "; ".join(f"rank {rank}: {m.get('error')}" for rank, m in failed)}
    outcome = unpack(coord.broadcast_bytes(pack(verdict) if coord.rank == 0 else None))
    if outcome.get("ok"):
        return None
    return error if error is not None else raised_elsewhere(outcome, "")


@dataclass(frozen=True)
class RankPart:
    """One rank's prepared part of a save: the tree and the arrays it writes, or the
    ``error`` that kept it from preparing them (it still takes part, to fail every rank)."""

    skeleton: Any
    arrays: Sequence[tuple[str, Any]]
    error: BaseException | None = None


@dataclass(frozen=True)
class RankedSave:
    """One save of several ranks as this rank runs it.

    ``commit(skeleton, arrays, participants)`` is rank 0's write and commit of the whole
    checkpoint; ``entries()`` is rank 0's list of checkpoints as plain data once it has
    committed; ``adopt(rows)`` takes that list on the other ranks.
    """

    coord: Coordinator
    part: RankPart
    store: Store
    max_file_bytes: int
    commit: Callable[[Any, Sequence[tuple[str, Any]], Participants], CheckpointInfo]
    entries: Callable[[], Any]
    adopt: Callable[[Any], None]

    def run(self) -> CheckpointInfo | None:
        """Take part now: rank 0 returns the new checkpoint's info, the others ``None``
        (after adopting rank 0's list). Raises the save's error on every rank."""
        if self.coord.rank == 0:
            return primary_save(self.coord, self._commit, self.entries)
        self.adopt(follower_save(self.coord, self.store, self.part.arrays, self.max_file_bytes,
                                 self.part.error))
        return None

    def run_reported_by_rank0(self) -> None:
        """A follower's background part: its errors reach every rank through rank 0 (the
        outcome is shared), so raising them from this rank's writer too would raise them twice."""
        try:
            self.run()
        except Exception as exc:
            log.debug("background save part failed (reported by rank 0): %s", exc)

    def _commit(self, participants: Participants) -> CheckpointInfo:
        if self.part.error is not None:
            raise self.part.error
        return self.commit(self.part.skeleton, self.part.arrays, participants)


def save_in_background(save: RankedSave, main: Coordinator,
                       submit: Callable[[Callable[[], object]], None]) -> None:
    """Every rank raises now (some rank could not stage its part), or every rank hands its
    part of ``save`` to ``submit`` (its writer thread). ``main`` is the training thread's
    coordinator: the background one belongs to the writer threads."""
    agreed = agree(main, save.part.error)
    if agreed is not None:
        raise agreed
    submit(save.run if save.coord.rank == 0 else save.run_reported_by_rank0)


def rank_part(state: Any, rank: int,
              stage: Callable[[list[tuple[str, Any]]], list[tuple[str, Any]]] | None) -> RankPart:
    """This rank's part of a save of several ranks; an error (an interrupt too) is kept, not
    raised, so that the rank still takes part and the save fails on every rank instead of
    hanging; this rank raises it once the others know."""
    try:
        skeleton, arrays = flatten(resolve_state(state))
        if stage is not None:  # followers write their pieces only: stage just those
            arrays = stage(arrays if rank == 0 else
                           [(k, v) for k, v in arrays if isinstance(v, ShardedArray)])
    except BaseException as exc:
        return RankPart(None, [], exc)
    return RankPart(skeleton, arrays)


def on_every_rank(coord: Coordinator, fn: Callable[[], None]) -> None:
    """``fn`` (the writer's ``wait`` or ``close``) on every rank, and rank 0's outcome on
    every rank: a follower's own errors are rank 0's to report."""
    if coord.rank != 0:
        fn()
    run_on_primary(coord, fn, lambda _: None, lambda _: None)
