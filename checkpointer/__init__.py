"""checkpointer: framework-agnostic checkpointing for training loops.

Saves state trees (nested dicts/lists/tuples of numpy arrays and plain values) as
safetensors plus a checksummed msgpack manifest, atomically, on any fsspec store; decides
when to save, which saves improve a monitored metric and which checkpoints to keep.
Framework adapters live in :mod:`checkpointer.adapters` and are imported on demand.

Example::

    from checkpointer import CheckpointManager
    with CheckpointManager("ckpts", monitor="val_loss", keep_best=3) as mgr:
        mgr.epoch_end(1, {"w": w}, metrics={"val_loss": 0.3})
"""

from __future__ import annotations

from .api import load, save
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    MetricError,
    StateTreeError,
    StorageError,
)
from .info import Checkpoint, CheckpointInfo
from .lazy import CheckpointReader, LazyTensor, open
from .manager import CheckpointManager, CheckpointWarning
from .version import __version__

__all__ = [
    "CheckpointManager",
    "CheckpointInfo",
    "Checkpoint",
    "CheckpointWarning",
    "save",
    "load",
    "open",
    "CheckpointReader",
    "LazyTensor",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "MetricError",
    "StateTreeError",
    "StorageError",
    "__version__",
]
