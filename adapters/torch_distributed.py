"""torch.distributed: rank agreement and the restore template of sharded objects.

``TorchCoordinator`` is used automatically by :class:`checkpointer.CheckpointManager` when
``torch.distributed`` is initialized with more than one process; pass
``coordinator=TorchCoordinator(group)`` to use a specific process group. Bytes travel as
uint8 tensors (msgpack inside), never pickled.

Saving and loading sharded objects (FSDP2 ``fully_shard`` modules, DTensors) uses the same
:func:`checkpointer.adapters.torch.to_state` / ``load_state`` as plain ones; what is
specific to several processes is here: ``template(obj)`` names the boxes this rank holds, so
that a restore reads only those, whatever the sharding at save time::

    from checkpointer.adapters.torch import load_state, to_state

    mgr.save({"model": to_state(model)}, step=step)
    ...
    state = mgr.restore(template={"model": template(model)}).state
    load_state(model, state["model"])
"""

from __future__ import annotations

from ._require import require

with require(__name__, "PyTorch", "torch"):
    import torch
    import torch.distributed as dist

import datetime
import zlib
from collections.abc import Mapping
from typing import Any

from torch.distributed import distributed_c10d
from torch.distributed.tensor import DTensor

from checkpointer.distributed import KeyValueCoordinator
from checkpointer.errors import ConfigurationError
from checkpointer.sharding import ShardSpec

from ._torch_codec import local_box, tensor_to_array
from .torch import is_stateful

__all__ = ["TorchCoordinator", "dtensor_spec", "template"]

_BACKGROUND: dict[tuple[int, ...], int] = {}  # background coordinators made, per group of ranks


class TorchCoordinator:
    """A :class:`checkpointer.distributed.Coordinator` over a torch.distributed group.

    Example::

        dist.init_process_group("gloo")
        mgr = CheckpointManager("ckpts", coordinator=TorchCoordinator())  # or automatic

    Raises:
        ConfigurationError: ``torch.distributed`` is not initialized.
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_initialized():
            raise ConfigurationError(
                "TorchCoordinator needs torch.distributed: call dist.init_process_group() first"
            )
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

    def any_flag(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: one all-reduce of one int (the preemption
        check at each save point, cheaper than a gather)."""
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self._device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

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


# -- restore templates --------------------------------------------------------------------

def dtensor_spec(t: DTensor) -> ShardSpec:
    """The box of the global array this rank holds in ``t`` (what it reads on restore)."""
    offsets, shape = local_box(t)
    dtype = tensor_to_array(torch.empty(0, dtype=t.dtype)).dtype
    return ShardSpec(tuple(t.shape), dtype, ((offsets, shape),))


def _spec_tree(node: Any) -> Any:
    if isinstance(node, DTensor):
        return dtensor_spec(node)
    if isinstance(node, Mapping):
        return {str(k): _spec_tree(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_spec_tree(v) for v in node]
    return None


def template(obj: Any) -> Any:
    """The restore template of ``obj``: what :func:`~checkpointer.adapters.torch.to_state`
    takes (a module, an optimizer, any object with ``state_dict()``, a dict of those, or a
    state dict), with a :class:`ShardSpec` at each DTensor and ``None`` elsewhere.

    Pass it as ``restore(template=...)`` at the place the state was saved: each DTensor is
    then read back as this rank's piece only, which ``load_state`` puts in place.

    Example::

        state = mgr.restore(template={"model": template(model), "optim": template(opt)}).state
        load_state({"model": model, "optim": opt}, state)
    """
    if is_stateful(obj):
        return _spec_tree(obj.state_dict())
    if isinstance(obj, Mapping):
        return {str(k): template(v) for k, v in obj.items()}
    return _spec_tree(obj)
