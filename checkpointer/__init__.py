"""checkpointer: framework-agnostic checkpointing for training loops.

Saves state trees (nested dicts/lists/tuples of numpy arrays and plain values) as
safetensors plus a checksummed msgpack manifest, atomically, on any fsspec store; decides
when to save, which saves improve a monitored metric and which checkpoints to keep.
Framework adapters live in :mod:`checkpointer.adapters` and are imported on demand.

Example (``CheckpointManager`` imported from this package)::

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
from .manager import CheckpointManager, CheckpointWarning
from .reader import CheckpointReader, LazyTensor
from .reader import open as open  # noqa: A004 - public, but not in __all__ (see below)
from .version import __version__

# ``open`` is public (``checkpointer.open(url)``) but left out of ``__all__``, so that
# ``from checkpointer import *`` never shadows the builtin.
__all__ = [
    "CheckpointManager",
    "CheckpointInfo",
    "Checkpoint",
    "CheckpointWarning",
    "save",
    "load",
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
