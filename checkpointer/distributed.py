"""Multi-process agreement: decisions made once, on the primary rank, and shared.

When a training job runs several processes (torch.distributed, JAX multi-process),
every rank makes the same :class:`~checkpointer.CheckpointManager` calls. The primary
(rank 0) applies schedule, monitor, save and retention; the others receive the outcome
(the new checkpoint, the list of checkpoints, or the error) through a
:class:`Coordinator`, so every rank sees the same answer even when metrics differ
slightly between ranks, and replicated state is written once. Payloads are msgpack,
never pickle. Framework coordinators live in the adapters and are picked up
automatically when the framework's process group is initialized.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgpack

from . import errors
from .errors import CheckpointError

__all__ = ["Coordinator", "SingleProcess", "KeyValueCoordinator", "background_coordinator", "detect_coordinator", "run_on_primary",
           "pack", "unpack", "failure", "raised_elsewhere"]

_T = TypeVar("_T")


@runtime_checkable
class Coordinator(Protocol):
    """The collective operations the manager needs from a distributed runtime.

    Call order: every rank calls each method the same number of times, in the same order.
    """

    rank: int
    world_size: int

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank (others pass ``None``)."""
        ...

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Every rank's ``data`` in rank order on rank 0; ``None`` on the others."""
        ...


class KeyValueCoordinator:
    """A coordinator over a key-value store that every process reaches (the store of
    torch.distributed, the client of ``jax.distributed``): it can run on any thread and
    never interleaves with the collectives of the training loop.

    ``put(key, value)`` stores bytes, ``get(key)`` waits for a key and returns its bytes,
    ``delete(key)`` removes it. ``prefix`` is the same on every process and used by this
    coordinator alone. Rank 0 deletes every key once all ranks have read it: a gather's
    keys when it has them all, a broadcast's at the next gather or at :meth:`close`
    (every rank has read it by then).
    """

    def __init__(self, rank: int, world_size: int, prefix: str, put: Callable[[str, bytes], Any],
                 get: Callable[[str], bytes], delete: Callable[[str], Any]) -> None:
        self.rank, self.world_size = rank, world_size
        self._prefix, self._put, self._get, self._delete = prefix, put, get, delete
        self._calls = 0
        self._read_by_all: list[str] = []

    def _key(self) -> str:
        self._calls += 1
        return f"{self._prefix}/{self._calls}"

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        key = self._key()
        if self.rank == 0:
            self._put(key, data or b"")
            self._read_by_all.append(key)
            return data or b""
        return bytes(self._get(key))

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        key = self._key()
        if self.rank != 0:
            self._put(f"{key}/{self.rank}", data)
            return None
        rows = [data]
        for r in range(1, self.world_size):
            rows.append(bytes(self._get(f"{key}/{r}")))
            self._delete(f"{key}/{r}")
        self.close()  # every rank has passed the broadcasts before this gather
        return rows

    def close(self) -> None:
        """Delete the broadcast keys (rank 0; call once every rank has read them)."""
        for key in self._read_by_all:
            self._delete(key)
        self._read_by_all.clear()


def background_coordinator(coord: Coordinator) -> Coordinator | None:
    """A second coordinator over the same processes for a background thread, or ``None``.

    A coordinator may offer ``background()``: a new coordinator whose collectives are
    independent of the original's, so that asynchronous saves can agree on their commit
    from a writer thread while the training loop keeps using the original. Every rank calls
    it at the same point (for torch it creates a process group). Without it, saves of
    several processes are synchronous.
    """
    make = getattr(coord, "background", None)
    if coord.world_size == 1 or make is None:
        return None
    bg: Coordinator = make()
    return bg


class SingleProcess:
    """The coordinator of a job with one process: everything is local."""

    rank = 0
    world_size = 1

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        return data or b""

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        return [data]


def pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def failure(exc: BaseException) -> dict[str, Any]:
    """``exc`` as a message to other ranks: ``{"ok": False, "error": ..., "type": ...}``."""
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__}


def raised_elsewhere(message: Any, where: str) -> CheckpointError:
    """The error of a :func:`failure` message, to raise on this rank: ``where: error`` (the
    error alone when ``where`` is empty), of the same class when it is one of
    :mod:`checkpointer.errors` (so ``except StorageError`` works on every rank), else a
    :class:`CheckpointError`.

    The class is looked up by name in ``checkpointer.errors.__all__`` only: a message from
    another process never chooses what gets instantiated beyond the engine's own tree.
    """
    fields = message if isinstance(message, dict) else {}
    name = fields.get("type")
    cls: type[CheckpointError] = CheckpointError
    if isinstance(name, str) and name in errors.__all__:
        cls = getattr(errors, name)
    text = str(fields.get("error"))
    return cls(f"{where}: {text}" if where else text)


def run_on_primary(coord: Coordinator, fn: Callable[[], _T], encode: Callable[[_T], Any],
                   decode: Callable[[Any], _T]) -> _T:
    """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank.

    On other ranks an error of rank 0 is raised as the same class of the engine's error
    tree (a :class:`CheckpointError` for any other exception) carrying rank 0's message,
    so no rank is left waiting in a collective.
    """
    if coord.world_size == 1:
        return fn()
    if coord.rank == 0:
        try:
            result = fn()
        except BaseException as exc:  # no rank may be left waiting in the broadcast
            coord.broadcast_bytes(pack(failure(exc)))
            raise
        coord.broadcast_bytes(pack({"ok": True, "value": encode(result)}))
        return result
    payload = unpack(coord.broadcast_bytes(None))
    if not payload.get("ok"):
        raise raised_elsewhere(payload, "rank 0 failed")
    return decode(payload["value"])


def detect_coordinator() -> Coordinator:
    """The coordinator of the running job: torch.distributed when it is initialized with
    more than one process, JAX when ``jax.distributed`` runs several processes, else a
    single process. Never imports a framework itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        module = importlib.import_module("checkpointer.adapters.torch_distributed")
        coord: Coordinator = module.TorchCoordinator()
        return coord
    jax_state = getattr(sys.modules.get("jax._src.distributed"), "global_state", None)
    if getattr(jax_state, "client", None) is not None and sys.modules["jax"].process_count() > 1:
        module = importlib.import_module("checkpointer.adapters.jax_distributed")
        coord = module.JaxCoordinator()
        return coord
    return SingleProcess()
