"""Shared helpers of the Keras cases: tiny data, a tiny model, weight snapshots.

Imported by ``keras_cases_*.py``, which run in a subprocess per backend (KERAS_BACKEND is set
before Keras is imported).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

EPOCHS = 5
BATCH = 16


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """64 training and 32 validation rows; noisy labels so that val_loss goes up and down."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 4)).astype("float32")
    y = ((x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=96)) > 0).astype("float32")
    return x[:64], y[:64], x[64:], y[64:]


def make_model(seed: int = 0, lr: float = 0.2, dtype: Any = None) -> keras.Model:
    """A seeded two-layer classifier, compiled with Adam."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, activation="relu", dtype=dtype),
        keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
    ])  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=["accuracy"])  # fmt: skip
    return model


def weights(model: keras.Model) -> list[np.ndarray]:
    """Copies of every model weight as numpy arrays."""
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


def opt_vars(model: keras.Model) -> list[np.ndarray]:
    """Copies of every optimizer variable as numpy arrays."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]


def assert_same(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 0.0) -> None:
    """Element-wise equality of two weight lists (exact unless ``rtol``)."""
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        np.testing.assert_allclose(u.astype(np.float64), v.astype(np.float64), rtol=rtol, atol=0)


def perturb(model: keras.Model, delta: float) -> None:
    """Shift every weight by ``delta`` (to tell apart the models saved at each step)."""
    for w in model.weights:
        w.assign(keras.ops.convert_to_numpy(w) + delta)


class Recorder(keras.callbacks.Callback):
    """Records each epoch's logs and weights (after the checkpoint callbacks listed before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.logs: list[dict[str, float]] = []
        self.weights: list[list[np.ndarray]] = []
        self.batch_logs: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.logs.append(dict(logs or {}))
        self.weights.append(weights(self.model))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.batch_logs.append(dict(logs or {}))


class Interrupt(keras.callbacks.Callback):
    """Raises ``RuntimeError`` when the given epoch (and batch, when given) begins."""

    def __init__(self, epoch: int, batch: int | None = None) -> None:
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, -1

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.current = epoch
        if epoch == self.epoch and self.batch is None:
            raise RuntimeError("interrupted")

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.current == self.epoch and batch == self.batch:
            raise RuntimeError("interrupted")
