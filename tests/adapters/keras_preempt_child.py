"""Child process of ``test_keras_preemption.py``: Keras ``fit`` stopped by a real signal.

``python keras_preempt_child.py preempt DIR``: trains (3 epochs of 8 batches) with three
callbacks that take ``save_on_preemption=True``: ``BackupAndRestore``
(synchronous), a ``ModelCheckpoint`` writing Keras ``.weights.h5`` files every 1000 batches
(never, but for the preemption) and one writing this project's format with
``save_best_only`` per epoch (both ``async_save=True``). It prints ``ready`` at
batch 2 of epoch 2 and waits there for the signal, which the parent then sends (so it
always comes at that batch end, after the callbacks' hooks). After ``fit`` returns it prints one
JSON line: the batches run when the signal came, the optimizer step, the epochs started,
whether each callback says it was preempted, and the weights at the stop (``DIR/stop.npz``).

``python keras_preempt_child.py resume DIR``: a fresh model (other initial weights) resumes
from the backup with ``BackupAndRestore`` and trains to the end; then a model trained
straight through, without interruption, in this process; the weights of the preemption
saves of both ``ModelCheckpoint`` callbacks are loaded. Then a run that signals itself
at the end of epoch 1 (no batch end comes before the callbacks' epoch ends). It prints one
JSON line of the largest differences and what that last run saved. ``KERAS_BACKEND`` is set
by the parent.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_lib import data, weights  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer import CheckpointManager  # noqa: E402
from checkpointer.adapters.keras import BackupAndRestore, ModelCheckpoint, load_state  # noqa: E402

EPOCHS, BATCH = 3, 8  # 64 rows: 8 batches per epoch
X, Y, XV, YV = data()


def make_model(seed: int = 0) -> keras.Model:
    """keras_lib's classifier, seeded through its initializers: ``keras.utils.set_random_seed``
    would import TensorFlow (12 s) only to seed it."""
    init = keras.initializers.GlorotUniform
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6, activation="relu", kernel_initializer=init(seed)),
        keras.layers.Dense(1, activation="sigmoid", kernel_initializer=init(seed + 1)),
    ])  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    return model


class Pacer(keras.callbacks.Callback):
    """Counts batch ends; at batch 2 of epoch 2 says ``ready`` and waits for the signal,
    whose handler (:meth:`note`, installed before ``fit``) notes the batches run then."""

    def __init__(self) -> None:
        super().__init__()
        self.batches, self.epoch = 0, 0
        self.at_signal: int | None = None

    def note(self, signum: int, frame: Any) -> None:
        if self.at_signal is None:
            self.at_signal = self.batches

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.batches += 1
        if self.epoch == 1 and batch == 1:
            print("ready", flush=True)
            deadline = time.monotonic() + 120
            while self.at_signal is None and time.monotonic() < deadline:
                time.sleep(0.01)


def fit(model: keras.Model, callbacks: list[Any]) -> Any:
    return model.fit(X, Y, validation_data=(XV, YV), epochs=EPOCHS, batch_size=BATCH,
                     shuffle=False, verbose=0, callbacks=callbacks)  # fmt: skip


def preempt(root: Path) -> None:
    pacer = Pacer()
    signal.signal(signal.SIGTERM, pacer.note)  # installed first: the callbacks chain it
    callbacks = [
        BackupAndRestore(root / "backup", save_on_preemption=True),
        ModelCheckpoint(str(root / "files" / "m-e{epoch}-b{batch}.weights.h5"), save_freq=1000,
                        save_weights_only=True, async_save=True, save_on_preemption=True),
        ModelCheckpoint(str(root / "managed"), monitor="val_loss", save_best_only=True,
                        async_save=True, save_on_preemption=True),
        pacer,
    ]  # fmt: skip
    model = make_model()
    history = fit(model, callbacks)
    np.savez(root / "stop.npz", *weights(model))
    print(json.dumps({
        "at_signal": pacer.at_signal,
        "step": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "epochs": len(history.epoch),
        "preempted": [cb.preempted for cb in callbacks[:3]],
        "files": sorted(f for f in os.listdir(root / "files") if not f.startswith(".")),
        "handler_restored": signal.getsignal(signal.SIGTERM) == pacer.note,
    }), flush=True)  # fmt: skip


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [u.shape for u in a] == [v.shape for v in b]
    return max(float(np.max(np.abs(u.astype(np.float64) - v))) for u, v in zip(a, b, strict=True))


def refusals(root: Path) -> list[str]:
    """The options refused at construction, each error's type and message."""
    bad: list[tuple[type[Any], dict[str, Any]]] = [
        (BackupAndRestore, {"save_on_preemption": 1}),
        (BackupAndRestore, {"preemption_signals": ["SIGKILL"]}),
        (ModelCheckpoint, {"filepath": str(root / "best.weights.h5"), "save_weights_only": True,
                           "save_best_only": True, "save_on_preemption": True}),
        (ModelCheckpoint, {"filepath": str(root / "best.safetensors"), "save_best_only": True,
                           "save_on_preemption": True}),
    ]  # fmt: skip
    out = []
    for cls, kwargs in bad:
        try:
            cls(**({"backup_dir": str(root / "b")} if cls is BackupAndRestore else {}), **kwargs)
        except ValueError as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


class SignalAtEpochEnd(keras.callbacks.Callback):
    """Sends this process SIGTERM at the end of epoch 1, before the callbacks after it."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def at_epoch_end(root: Path) -> dict[str, Any]:
    callbacks = [
        SignalAtEpochEnd(),
        BackupAndRestore(root / "backup", save_freq=3, save_on_preemption=True),
        ModelCheckpoint(str(root / "files" / "m-e{epoch}-b{batch}.weights.h5"), save_freq=1000,
                        save_weights_only=True, save_on_preemption=True),
    ]  # fmt: skip
    history = fit(make_model(), callbacks)
    state = checkpointer.load(CheckpointManager(root / "backup").latest.url)  # type: ignore[union-attr]
    return {"epochs": len(history.epoch), "preempted": [cb.preempted for cb in callbacks[1:]],
            "backup": [state["epoch"], state["batch"], state["step"]],
            "files": sorted(f for f in os.listdir(root / "files") if not f.startswith("."))}  # fmt: skip


def resume(root: Path) -> None:
    stop = list(np.load(root / "stop.npz").values())
    (name,) = [f for f in os.listdir(root / "files") if not f.startswith(".")]
    from_file = make_model(seed=5)
    from_file.optimizer.build(from_file.trainable_variables)  # the file holds its variables
    from_file.load_weights(str(root / "files" / name))
    managed = make_model(seed=6)
    load_state(managed, CheckpointManager(root / "managed").restore("latest").state)
    resumed = make_model(seed=11)  # a new process rebuilds the model from code
    cb = BackupAndRestore(root / "backup", save_on_preemption=True)
    history = fit(resumed, [cb])
    straight = make_model()
    fit(straight, [])
    print(json.dumps({
        "file_vs_stop": max_diff(weights(from_file), stop),
        "managed_vs_stop": max_diff(weights(managed), stop),
        "resumed_vs_straight": max_diff(weights(resumed), weights(straight)),
        "resumed_epochs": history.epoch,
        "preempted": cb.preempted,
        "backup_left": (root / "backup").exists(),
        "refused": refusals(root),
        "at_epoch_end": at_epoch_end(root / "epoch_end"),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    {"preempt": preempt, "resume": resume}[sys.argv[1]](Path(sys.argv[2]))
