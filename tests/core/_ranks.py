"""Ranks as threads: a coordinator whose collectives are barriers between threads.

It stands in for torch.distributed / JAX (the real runtimes are tested in
tests/distributed): the save protocol and the error agreement are the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from checkpointer.distributed import KeyValueCoordinator

RANKS = 3


class Store:
    """A key-value store shared by the thread ranks (as torch's TCPStore or the
    jax.distributed client would be by processes)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def put(self, key: str, value: bytes) -> None:
        with self.cond:
            assert key not in self.data, f"key {key} written twice"
            self.data[key] = bytes(value)
            self.cond.notify_all()

    def get(self, key: str) -> bytes:
        with self.cond:
            assert self.cond.wait_for(lambda: key in self.data, timeout=60), f"no key {key}"
            return self.data[key]

    def delete(self, key: str) -> None:
        with self.cond:
            del self.data[key]


class _Group:
    def __init__(self, n: int) -> None:
        self.n, self.slots = n, [b""] * n
        self.barrier = threading.Barrier(n, timeout=60)
        self.store = Store()


class ThreadCoordinator:
    """Collectives between threads; ``background()`` gives a group of its own."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.n
        self._forks = 0

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        if self.rank == 0:
            self.group.slots[0] = data or b""
        self.group.barrier.wait()
        out = self.group.slots[0]
        self.group.barrier.wait()
        return out

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        self.group.slots[self.rank] = data
        self.group.barrier.wait()
        out = list(self.group.slots) if self.rank == 0 else None
        self.group.barrier.wait()
        return out

    def background(self) -> KeyValueCoordinator:
        self._forks += 1  # every rank makes its background coordinators in the same order
        store = self.group.store
        return KeyValueCoordinator(self.rank, self.world_size, f"bg{self._forks}", store.put, store.get,
                                   store.delete)


class NoBackground(ThreadCoordinator):
    background = None  # type: ignore[assignment]


def run_ranks(body: Callable[[int, ThreadCoordinator], Any], coordinator: type = ThreadCoordinator,
              stores: list[Store] | None = None, ranks: int = RANKS) -> list[Any]:
    """Run ``body(rank, coord)`` on ``ranks`` threads; their results, or raise the first error."""
    group = _Group(ranks)
    if stores is not None:
        stores.append(group.store)
    results: list[Any] = [None] * ranks

    def target(rank: int) -> None:
        try:
            results[rank] = body(rank, coordinator(group, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            results[rank] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a rank hung"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
