"""A Checkpoint (what restore() returns) handed where a state belongs says "pass its .state"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpointer import CheckpointManager
from checkpointer.errors import StateTreeError


def test_jax_from_state_names_the_fix(tmp_path: Path) -> None:
    jax_adapter = pytest.importorskip("checkpointer.adapters.jax")
    CheckpointManager(tmp_path).save({"w": np.ones(2, np.float32)})
    ckpt = CheckpointManager(tmp_path).restore()
    with pytest.raises(StateTreeError, match=r"pass its \.state"):
        jax_adapter.from_state({"w": np.zeros(2, np.float32)}, ckpt)


def test_keras_load_state_names_the_fix(tmp_path: Path) -> None:
    code = f"""
import numpy as np, keras
from checkpointer import CheckpointManager
from checkpointer.adapters.keras import load_state
from checkpointer.errors import StateTreeError
CheckpointManager({str(tmp_path)!r}).save({{"w": np.ones(2)}})
ckpt = CheckpointManager({str(tmp_path)!r}).restore()
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
try:
    load_state(model, ckpt)
except StateTreeError as exc:
    assert "pass its .state" in str(exc), exc
    print("refused")
"""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("refused")
