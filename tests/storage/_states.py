"""Shared by the storage tests: small states whose value is easy to check, and listings."""

from __future__ import annotations

from typing import Any

import numpy as np

from checkpointer import CheckpointManager


def _state(v: float, n: int = 4) -> dict[str, Any]:
    return {"w": [np.full(8, v, np.float32) for _ in range(n)], "v": v, "t": (int(v), "x")}


def _value(state: dict[str, Any]) -> float:
    return float(state["v"])


def _names(mgr: CheckpointManager) -> list[str]:
    return [c.name for c in mgr.checkpoints]


def _data_files(backend: Any, name: str) -> list[str]:
    return [f for f in backend.listdir(name) if f.endswith(".safetensors")]
