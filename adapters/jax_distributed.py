"""JAX multi-process: rank agreement and the restore template of arrays spread over processes.

``JaxCoordinator`` is used automatically by :class:`checkpointer.CheckpointManager` once
``jax.distributed.initialize`` has started more than one process. Saving and loading use the
same :func:`checkpointer.adapters.jax.to_state` / ``from_state`` as one process (each
``jax.Array`` spread over processes becomes the pieces this process writes, replicas once);
what is specific to several processes is here: ``template(tree)`` names the boxes this
process's devices hold, so that a restore reads only those, and ``from_state`` rebuilds the
arrays with the template's shardings (a checkpoint written on one mesh restores onto
another)::

    from checkpointer.adapters.jax import from_state, to_state

    mgr.save(to_state({"w": w}), step=step)
    w = from_state({"w": w}, mgr.restore(template=template({"w": w})).state)["w"]
"""

from __future__ import annotations

from ._require import require

with require(__name__, "JAX", "jax"):
    import jax
    from jax.experimental import multihost_utils

from typing import Any

import numpy as np

from checkpointer.distributed import KeyValueCoordinator
from checkpointer.errors import ConfigurationError

from ._jax_sharded import array_spec, is_spread
from ._jax_tree import encode, is_key

__all__ = ["JaxCoordinator", "template"]


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
        the same point.

        Raises:
            ConfigurationError: ``jax.distributed`` is not initialized.
        """
        from jax._src import distributed  # private, no public handle on the client: lazily

        client = distributed.global_state.client
        if client is None:
            raise ConfigurationError(
                "an asynchronous save on several JAX processes needs jax.distributed: "
                "call jax.distributed.initialize() first"
            )
        global _BACKGROUND
        _BACKGROUND += 1
        timeout_ms = int(timeout_s * 1000)
        return KeyValueCoordinator(
            self.rank, self.world_size, f"checkpointer/kv{_BACKGROUND}", client.key_value_set_bytes,
            lambda key: client.blocking_key_value_get_bytes(key, timeout_ms), client.key_value_delete)


_BACKGROUND = 0  # background coordinators made by this process


def template(tree: Any) -> Any:
    """The restore template of ``tree``, shaped like ``to_state(tree)``: a :class:`ShardSpec`
    (the boxes this process's devices hold) per ``jax.Array`` spread over processes, ``None``
    elsewhere (read whole).

    Example::

        state = mgr.restore(template=template(like)).state
        restored = from_state(like, state)    # from checkpointer.adapters.jax
    """
    specs = jax.tree_util.tree_map(
        lambda x: array_spec(x) if is_spread(x) and not is_key(x) else None, tree
    )
    return encode(specs)
