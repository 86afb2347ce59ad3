"""torch.distributed coordinator: lets every rank agree on checkpoint decisions.

Used automatically by :class:`checkpointer.CheckpointManager` when
``torch.distributed`` is initialized with more than one process; pass
``coordinator=TorchCoordinator(group)`` to use a specific process group. Bytes travel as
uint8 tensors (msgpack inside), never pickled.
"""

from __future__ import annotations

try:
    import torch
    import torch.distributed as dist
except ImportError as exc:  # pragma: no cover - exercised without torch only
    raise ImportError(
        "checkpointer.adapters.torch_distributed needs PyTorch: pip install 'checkpointer-engine[torch]'"
    ) from exc

from typing import Any

__all__ = ["TorchCoordinator"]


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
