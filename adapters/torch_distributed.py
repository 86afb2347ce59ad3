"""torch.distributed: rank agreement and sharded tensors (DTensor, FSDP2).

``TorchCoordinator`` is used automatically by :class:`checkpointer.CheckpointManager` when
``torch.distributed`` is initialized with more than one process; pass
``coordinator=TorchCoordinator(group)`` to use a specific process group. Bytes travel as
uint8 tensors (msgpack inside), never pickled. ``to_state(model.state_dict())`` turns
DTensors (FSDP2 ``fully_shard`` parameters included) into the pieces each rank writes;
``restore(template=template(sd))`` then ``load_state(sd, state)`` reads back only this
rank's boxes, whatever the sharding at save time::

    sd = model.state_dict()
    mgr.save(to_state(sd), step=step)
    ...
    load_state(sd, mgr.restore(template=template(sd)).state)
"""

from __future__ import annotations

try:
    import torch
    import torch.distributed as dist
except ImportError as exc:  # pragma: no cover - exercised without torch only
    raise ImportError(
        "checkpointer.adapters.torch_distributed needs PyTorch: pip install 'checkpointer-engine[torch]'"
    ) from exc

import datetime
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.distributed import distributed_c10d
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from checkpointer.distributed import KeyValueCoordinator
from checkpointer.errors import StateTreeError
from checkpointer.sharding import Shard, ShardedArray, ShardSpec

from ._torch_codec import array_to_tensor, tensor_to_array

__all__ = ["TorchCoordinator", "dtensor_to_sharded", "dtensor_spec", "to_state", "template", "load_state"]

_BACKGROUND: dict[tuple[int, ...], int] = {}  # background coordinators made, per group of ranks




class TorchCoordinator:
    """A :class:`checkpointer.distributed.Coordinator` over a torch.distributed group.

    Example::

        dist.init_process_group("gloo")
        mgr = CheckpointManager("ckpts", coordinator=TorchCoordinator())  # or automatic
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0
        backend = dist.get_backend(group)
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")

    def background(self, timeout_s: float = 1800.0) -> KeyValueCoordinator:
        """A coordinator for the asynchronous writer thread, over torch.distributed's store
        (a connection of its own), not over collectives: those of one group must not
        interleave between threads. Every rank of the group calls it at the same point."""
        ranks = tuple(dist.get_process_group_ranks(self.group if self.group is not None else dist.group.WORLD))
        _BACKGROUND[ranks] = n = _BACKGROUND.get(ranks, 0) + 1
        store = distributed_c10d._get_default_store().clone()
        wait = datetime.timedelta(seconds=timeout_s)

        def get(key: str) -> bytes:
            store.wait([key], wait)
            value: bytes = store.get(key)
            return value
        prefix = f"checkpointer/{zlib.crc32(repr(ranks).encode()):08x}-{len(ranks)}/{n}"
        return KeyValueCoordinator(self.rank, self.world_size, prefix, store.set, get, store.delete_key)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's ``data`` on every rank of the group."""
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=self._device)
        dist.broadcast(size, src=self._src, group=self.group)
        n = int(size.item())
        if self.rank == 0 and data is not None:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._device) if n else \
                torch.empty(0, dtype=torch.uint8, device=self._device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self._device)
        if n:
            dist.broadcast(buf, src=self._src, group=self.group)
        return bytes(buf.cpu().numpy().tobytes())

    def gather_bytes(self, data: bytes) -> list[bytes] | None:
        """Every rank's ``data`` in rank order on rank 0; ``None`` elsewhere."""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        width = max(lengths + [1])
        buf = torch.zeros(width, dtype=torch.uint8, device=self._device)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.rank != 0:  # a gather, not an all-gather: only rank 0 receives the records
            dist.gather(buf, None, dst=self._src, group=self.group)
            return None
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.gather(buf, bufs, dst=self._src, group=self.group)
        return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths, strict=True)]


# -- sharded tensors ---------------------------------------------------------------------

def _numpy(t: torch.Tensor) -> np.ndarray:
    return tensor_to_array(t.detach())


def _torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return array_to_tensor(np.asarray(a), copy=False).to(dtype)


def _is_writer(t: DTensor) -> bool:
    """Replicated pieces are written once: by the rank at coordinate 0 of each replicated dim."""
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return False
    return all(c == 0 for c, p in zip(coord, t.placements, strict=True) if not p.is_shard())


def dtensor_to_sharded(t: DTensor) -> ShardedArray:
    """The pieces of ``t`` this rank writes, as a framework-free :class:`ShardedArray`."""
    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = _numpy(t.to_local())
    dtype = local.dtype
    shards = (Shard(tuple(offsets), local.reshape(shape)),) if _is_writer(t) else ()
    return ShardedArray(tuple(t.shape), dtype, shards)


def dtensor_spec(t: DTensor) -> ShardSpec:
    """The box of the global array this rank holds in ``t`` (what it reads on restore)."""
    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return ShardSpec(tuple(t.shape), _numpy(torch.empty(0, dtype=t.dtype)).dtype,
                     ((tuple(offsets), tuple(shape)),))


def to_state(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A (possibly sharded) ``state_dict`` as a state tree: DTensors (FSDP2 parameters
    included) become :class:`ShardedArray`, other tensors numpy arrays."""
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        if isinstance(v, DTensor):
            out[k] = dtensor_to_sharded(v)
        elif isinstance(v, torch.Tensor):
            out[k] = _numpy(v)
        elif isinstance(v, Mapping):
            out[k] = to_state(v)
        else:
            out[k] = v
    return out


def template(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The restore template of ``state_dict``: a :class:`ShardSpec` per DTensor."""
    return {k: dtensor_spec(v) if isinstance(v, DTensor) else
            template(v) if isinstance(v, Mapping) else None for k, v in state_dict.items()}


def load_state(state_dict: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Copy a restored state into ``state_dict``'s tensors in place (each DTensor's local
    shard from the matching :class:`ShardedArray` piece). Missing keys raise."""
    missing = [k for k in state_dict if k not in state]
    if missing:
        raise StateTreeError(f"restored state lacks {missing}")
    for k, v in state_dict.items():
        got = state[k]
        if isinstance(v, DTensor):
            if not isinstance(got, ShardedArray) or len(got.shards) != 1:
                raise StateTreeError(f"{k!r}: restore with template(state_dict) to get this rank's piece")
            with torch.no_grad():
                v.to_local().copy_(_torch(got.shards[0].data, v.dtype).reshape(v.to_local().shape))
        elif isinstance(v, torch.Tensor):
            with torch.no_grad():
                v.copy_(_torch(np.asarray(got), v.dtype).reshape(v.shape))
        elif isinstance(v, Mapping):
            load_state(v, got)
