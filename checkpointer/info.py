"""The data the public API hands out: :class:`CheckpointInfo` and :class:`Checkpoint`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckpointInfo", "Checkpoint"]


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint.

    Attributes:
        name: folder name inside the manager's directory.
        url: full path or URL of that folder.
        step, epoch: the caller's numbers at save time (``None`` when not given).
        metrics: the metrics given at save time.
        time: commit time (seconds since the epoch, from the manager's clock).
        nbytes: bytes on storage (data files and manifest).
    """

    name: str
    url: str
    step: int | None
    epoch: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0
    nbytes: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """A restored checkpoint: its :class:`CheckpointInfo` and the state tree."""

    info: CheckpointInfo
    state: Any
