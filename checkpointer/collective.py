"""One save written by several ranks, committed once.

The fixed sequence of collectives (every rank takes part in each, whatever fails):

1. broadcast from rank 0: the staging folder and file prefix (or rank 0's error);
2. gather to rank 0: each rank's data-file and piece records, written and fsynced
   (or that rank's error);
3. broadcast from rank 0: the outcome (the new list of checkpoints, or the error).

Rank 0 writes the manifest between 2 and 3, so it appears only after every rank's data
is durable; any rank's failure means no checkpoint and the same error on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .commit import Participants, write_rank_files
from .distributed import Coordinator, pack, unpack
from .errors import CheckpointError
from .info import CheckpointInfo
from .manifest import FileRow, Piece, TensorRow
from .sharding import split_pieces
from .storage import Store

__all__ = ["primary_save", "follower_save", "agree"]


def _rank_reply(files: list[FileRow], tensors: list[TensorRow], pieces: list[Piece]) -> dict[str, Any]:
    """One rank's written rows, as sent to rank 0 (the manifest's own row encodings)."""
    return {"ok": True, "files": [f.encode() for f in files], "tensors": [t.encode() for t in tensors],
            "pieces": [list(p) for p in pieces], "blocks": {t.key: list(t.blocks) for t in tensors if t.blocks}}


def _rank_rows(reply: dict[str, Any]) -> tuple[list[FileRow], list[TensorRow], list[Piece]]:
    """The rows of :func:`_rank_reply` back as typed rows."""
    blocks = reply.get("blocks", {})
    files = [FileRow(*row) for row in reply["files"]]
    tensors = [TensorRow(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], r[6], tuple(blocks.get(r[0], ())))
               for r in reply["tensors"]]
    pieces = [Piece(p[0], p[1], tuple(p[2]), p[3], tuple(p[4]), tuple(p[5])) for p in reply["pieces"]]
    return files, tensors, pieces


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
                raise CheckpointError(f"rank {rank} failed to write its part: {reply.get('error')}")
            more = _rank_rows(reply)
            files, tensors, pieces = files + more[0], tensors + more[1], pieces + more[2]
        return files, tensors, pieces


def primary_save(coord: Coordinator, write: Callable[[Participants], CheckpointInfo],
                 entries: Callable[[], Any]) -> CheckpointInfo:
    """Rank 0: run ``write`` (the manager's commit) with the other ranks taking part."""
    part = _Primary(coord)
    try:
        info = write(part)
    except BaseException as exc:
        error = pack({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
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
        raise CheckpointError(f"rank 0 failed: {where.get('error')}")
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
    except Exception as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    coord.gather_bytes(pack(reply))
    outcome = unpack(coord.broadcast_bytes(None))
    if error is not None:
        raise error
    if not reply["ok"]:
        raise CheckpointError(f"rank {coord.rank} failed to write its part: {reply['error']}")
    if not outcome.get("ok"):
        raise CheckpointError(f"rank 0 failed: {outcome.get('error')}")
    return outcome["entries"]


def agree(coord: Coordinator, error: BaseException | None) -> BaseException | None:
    """Every rank's view of a collective step: ``None`` only when no rank failed."""
    replies = coord.gather_bytes(pack("" if error is None else f"rank {coord.rank}: {error}"))
    verdict = None
    if replies is not None:
        failed = [m for m in (unpack(r) for r in replies) if m]
        verdict = "; ".join(failed) if failed else ""
    message = unpack(coord.broadcast_bytes(pack(verdict) if coord.rank == 0 else None))
    if not message:
        return None
    return error if error is not None else CheckpointError(message)


