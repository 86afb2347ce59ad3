"""JAX multi-process: rank agreement and arrays sharded across processes.

``JaxCoordinator`` is used automatically by :class:`checkpointer.CheckpointManager` once
``jax.distributed.initialize`` has started more than one process. ``to_state(tree)``
turns each ``jax.Array`` into the pieces this process writes (replicas once, by replica
0); ``restore(template=template(tree))`` reads back only the boxes this process's devices
hold, and ``from_state(tree, state)`` rebuilds arrays with the template's sharding, so a
checkpoint written on one mesh restores onto another::

    mgr.save(to_state({"w": w}), step=step)
    w = from_state({"w": w}, mgr.restore(template=template({"w": w})).state)["w"]
"""

from __future__ import annotations

try:
    import jax
    from jax.experimental import multihost_utils
except ImportError as exc:  # pragma: no cover - exercised without jax only
    raise ImportError(
        "checkpointer.adapters.jax_distributed needs JAX: pip install 'checkpointer-engine[jax]'"
    ) from exc

from typing import Any

import numpy as np

from checkpointer.distributed import KeyValueCoordinator
from checkpointer.errors import StateTreeError
from checkpointer.sharding import Shard, ShardedArray, ShardSpec

__all__ = ["JaxCoordinator", "array_to_sharded", "array_spec", "to_state", "template", "from_state"]


def _pad(data: bytes, width: int) -> np.ndarray:
    buf = np.zeros(width, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return buf


class JaxCoordinator:
    """A :class:`checkpointer.distributed.Coordinator` over JAX's processes."""

    def __init__(self) -> None:
        self.rank = jax.process_index()
        self.world_size = jax.process_count()

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Process 0's ``data`` on every process."""
        n = int(
            multihost_utils.broadcast_one_to_all(np.array([len(data or b"")], dtype=np.int64))[0]
        )
        buf = multihost_utils.broadcast_one_to_all(_pad(data or b"", max(n, 1)))
        return bytes(np.asarray(buf, dtype=np.uint8)[:n].tobytes())

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Every process's ``data`` in process order on process 0; ``None`` elsewhere."""
        sizes = np.asarray(
            multihost_utils.process_allgather(np.array([len(data)], dtype=np.int64))
        ).reshape(-1)
        width = max(int(sizes.max()), 1)
        rows = np.asarray(multihost_utils.process_allgather(_pad(data, width))).reshape(
            self.world_size, width
        )
        if self.rank != 0:
            return None
        return [bytes(rows[i, : int(sizes[i])].tobytes()) for i in range(self.world_size)]


    def background(self, timeout_s: float = 1800.0) -> KeyValueCoordinator:
        """A coordinator for the asynchronous writer thread: it talks through the
        ``jax.distributed`` key-value store, not through device collectives, so it never
        interleaves with the computations of the training loop. Every process calls it at
        the same point."""
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("jax.distributed is not initialized")
        global _BACKGROUND
        _BACKGROUND += 1
        timeout_ms = int(timeout_s * 1000)
        return KeyValueCoordinator(
            self.rank, self.world_size, f"checkpointer/kv{_BACKGROUND}", client.key_value_set_bytes,
            lambda key: client.blocking_key_value_get_bytes(key, timeout_ms), client.key_value_delete)


_BACKGROUND = 0  # background coordinators made by this process


def _start(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(0 if s.start is None else int(s.start) for s in index) + (0,) * (
        len(shape) - len(index)
    )


def array_to_sharded(x: jax.Array) -> ShardedArray:
    """The pieces of ``x`` this process writes: its addressable shards of replica 0."""
    shards = tuple(
        Shard(_start(s.index, x.shape), np.asarray(s.data))
        for s in x.addressable_shards
        if s.replica_id == 0
    )
    return ShardedArray(tuple(x.shape), np.dtype(x.dtype), shards)


def array_spec(x: jax.Array) -> ShardSpec:
    """The boxes this process's devices hold of ``x`` (what it reads on restore)."""
    boxes = {}
    for s in x.addressable_shards:
        start = _start(s.index, x.shape)
        boxes[start] = (start, tuple(s.data.shape))
    return ShardSpec(tuple(x.shape), np.dtype(x.dtype), tuple(boxes.values()))


def _map(fn: Any, tree: Any) -> Any:
    return jax.tree_util.tree_map(
        fn, tree, is_leaf=lambda x: isinstance(x, (ShardedArray, ShardSpec))
    )


def to_state(tree: Any) -> Any:
    """``tree`` with every ``jax.Array`` as a :class:`ShardedArray` of this process's pieces."""
    return _map(lambda x: array_to_sharded(x) if isinstance(x, jax.Array) else x, tree)


def template(tree: Any) -> Any:
    """The restore template of ``tree``: a :class:`ShardSpec` per ``jax.Array``."""
    return _map(lambda x: array_spec(x) if isinstance(x, jax.Array) else None, tree)


def from_state(like: Any, state: Any) -> Any:
    """Arrays with ``like``'s shardings from a state restored with ``template(like)``."""

    def build(x: Any, got: Any) -> Any:
        if not isinstance(x, jax.Array):
            return got
        if not isinstance(got, ShardedArray):
            raise StateTreeError("restore with template(tree) to get this process's pieces")
        pieces = {s.offsets: s.data for s in got.shards}
        arrays = [
            jax.device_put(pieces[_start(s.index, x.shape)], s.device) for s in x.addressable_shards
        ]
        return jax.make_array_from_single_device_arrays(x.shape, x.sharding, arrays)

    return jax.tree_util.tree_map(
        build, like, state, is_leaf=lambda v: isinstance(v, (ShardedArray, ShardSpec))
    )
