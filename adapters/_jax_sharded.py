"""Where arrays live: a restored array placed like its template leaf, and ``jax.Array``s
spread over several processes (the pieces a process writes, the boxes it reads back, an
array rebuilt from restored pieces).

Used by :mod:`checkpointer.adapters.jax` (``to_state`` / ``from_state`` handle arrays that
are not fully addressable) and :mod:`checkpointer.adapters.jax_distributed` (``template``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from checkpointer.sharding import Shard, ShardedArray, ShardSpec

__all__ = ["to_device", "is_spread", "array_to_sharded", "array_spec", "from_pieces"]


def _start(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(0 if s.start is None else int(s.start) for s in index) + (0,) * (
        len(shape) - len(index)
    )


def is_spread(x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` with shards on other processes' devices."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def array_to_sharded(x: jax.Array) -> ShardedArray:
    """The pieces of ``x`` this process writes: its addressable shards of replica 0."""
    shards = tuple(
        Shard(_start(s.index, x.shape), np.array(s.data, copy=True))
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


def from_pieces(like: Any, got: ShardedArray) -> jax.Array | str:
    """An array placed like the template leaf ``like`` from this process's restored pieces,
    or the reason it cannot be built (a box of ``like``'s devices that no piece holds)."""
    shape = tuple(like.shape)
    if got.shape != shape or got.dtype != np.dtype(like.dtype):
        return f"the state has sharded {got.dtype}{list(got.shape)}, the template {like.dtype}{list(shape)}"
    pieces = {s.offsets: s.data for s in got.shards}
    arrays = []
    for device, index in like.sharding.addressable_devices_indices_map(shape).items():
        piece = pieces.get(_start(index, shape))
        if piece is None:
            return "no restored piece for this process's box: restore with template(tree)"
        arrays.append(jax.device_put(piece, device))
    return jax.make_array_from_single_device_arrays(shape, like.sharding, arrays)


def to_device(arr: Any, like: Any) -> jax.Array:
    """``arr`` as a jax.Array placed like the template leaf ``like`` (sharding, weak type)."""
    sharding = getattr(like, "sharding", None)
    if sharding is not None and not sharding.is_fully_addressable:  # other processes' devices
        host = np.asarray(arr)
        out = jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    elif sharding is not None and getattr(like, "committed", True):
        out = jax.device_put(arr, sharding)
    else:
        out = jax.device_put(arr)
    if getattr(like, "weak_type", False) and not out.weak_type:
        # Weak types steer dtype promotion; losing one would change later arithmetic.
        try:
            from jax._src.lax.lax import _convert_element_type  # no public equivalent
        except ImportError:  # pragma: no cover - a JAX that moved it: keep the strong type
            pass
        else:
            out = _convert_element_type(out, None, weak_type=True)
    result: jax.Array = out
    return result
