"""to_state/load_state and BackupAndRestore cases, run once per Keras backend by ``test_keras.py``."""

from __future__ import annotations

import functools
from pathlib import Path

import fsspec
import keras
import ml_dtypes
import numpy as np
import pytest
from keras_lib import BATCH, Interrupt, assert_same, data, make_model, opt_vars, weights

import checkpointer
from checkpointer import CheckpointManager, StateTreeError
from checkpointer.adapters import keras as ck

X, Y, XV, YV = data()


def test_round_trip_weights_optimizer_and_iterations(tmp_path: Path) -> None:
    model = make_model()
    model.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0)
    state = ck.to_state(model)
    assert list(state["weights"]) == [w.path for w in model.weights]
    checkpointer.save(str(tmp_path / "s"), state)
    fresh = make_model(seed=7)  # other layer names (dense_2...) and an unbuilt optimizer
    assert [w.path for w in fresh.weights] != [w.path for w in model.weights]
    ck.load_state(fresh, checkpointer.load(str(tmp_path / "s")))
    assert_same(weights(fresh), weights(model))
    assert_same(opt_vars(fresh), opt_vars(model))
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 64 // BATCH
    weights_only = ck.to_state(model, include_optimizer=False)
    assert set(weights_only) == {"weights"}


def test_training_continues_identically_after_load(tmp_path: Path) -> None:
    model = make_model()
    model.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0, shuffle=False)
    checkpointer.save(str(tmp_path / "s"), ck.to_state(model))
    model.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0, shuffle=False)
    fresh = make_model(seed=7)
    ck.load_state(fresh, checkpointer.load(str(tmp_path / "s")))
    fresh.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0, shuffle=False)
    assert_same(weights(fresh), weights(model), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16", "mixed_float16"])
def test_bfloat16_and_mixed_precision(tmp_path: Path, dtype: str) -> None:
    # mixed_float16 as the global policy makes compile() wrap Adam in a LossScaleOptimizer
    keras.mixed_precision.set_global_policy(dtype if dtype == "mixed_float16" else "float32")
    try:
        layer_dtype = None if dtype == "mixed_float16" else dtype
        model = make_model(dtype=layer_dtype)
        model.optimizer.build(model.trainable_variables)
        fresh = make_model(seed=4, dtype=layer_dtype)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    state = ck.to_state(model)
    bf16 = {np.dtype(ml_dtypes.bfloat16)}
    kinds = {a.dtype for a in state["weights"].values()}
    assert kinds == (bf16 if dtype == "bfloat16" else {np.dtype("float32")})
    checkpointer.save(str(tmp_path / "s"), state)
    back = checkpointer.load(str(tmp_path / "s"))
    assert {a.dtype for a in back["weights"].values()} == kinds
    ck.load_state(fresh, back)
    assert_same(weights(fresh), weights(model))
    assert_same(opt_vars(fresh), opt_vars(model))


def test_mismatched_state_raises_before_assigning() -> None:
    model = make_model()
    state = ck.to_state(model)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    before = weights(other)
    with pytest.raises(StateTreeError, match="shape"):
        ck.load_state(other, state)
    assert_same(weights(other), before)
    with pytest.raises(StateTreeError):
        ck.load_state(other, {"weights": {"a": np.zeros(1)}})
    with pytest.raises(StateTreeError):
        ck.load_state(other, {"nothing": 1})


@functools.cache
def reference_run(epochs: int) -> list[np.ndarray]:
    model = make_model()
    model.fit(X, Y, epochs=epochs, batch_size=BATCH, verbose=0, shuffle=False)
    return weights(model)


@pytest.mark.parametrize(("backup_dir", "save_freq", "stop"), [
    ("local", "epoch", (2, None)),
    ("memory", 3, (1, 2)),
])  # fmt: skip
def test_backup_and_restore_resumes_exactly(
    tmp_path: Path, backup_dir: str, save_freq, stop: tuple[int, int | None]
) -> None:
    epochs = 3
    expected = reference_run(epochs)
    url = (str(tmp_path / "backup") if backup_dir == "local"
           else f"memory://backup-{keras.backend.backend()}-{save_freq}")  # fmt: skip
    model = make_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(
            X,
            Y,
            epochs=epochs,
            batch_size=BATCH,
            verbose=0,
            shuffle=False,
            callbacks=[ck.BackupAndRestore(url, save_freq=save_freq), Interrupt(*stop)],
        )
    latest = CheckpointManager(url).latest
    assert latest is not None
    resumed = make_model(seed=11)  # a fresh process would rebuild the model from code
    history = resumed.fit(
        X,
        Y,
        epochs=epochs,
        batch_size=BATCH,
        verbose=0,
        shuffle=False,
        callbacks=[ck.BackupAndRestore(url, save_freq=save_freq)],
    )
    assert len(history.history["loss"]) == epochs - stop[0]
    assert_same(weights(resumed), expected, rtol=1e-5)
    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(root)  # delete_checkpoint=True removed the backups
    assert resumed._initial_epoch is None


def test_backup_double_checkpoint_falls_back(tmp_path: Path) -> None:
    url = str(tmp_path / "backup")
    model = make_model()
    cb = ck.BackupAndRestore(url, double_checkpoint=True, delete_checkpoint=False)
    model.fit(X, Y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    names = [c.name for c in CheckpointManager(url).checkpoints]
    assert len(names) == 2
    newest = next((tmp_path / "backup" / names[-1]).glob("*.safetensors"))
    raw = bytearray(newest.read_bytes())
    raw[-1] ^= 0xFF
    newest.write_bytes(bytes(raw))
    resumed = make_model(seed=2)
    with pytest.warns(UserWarning, match="falling back"):
        history = resumed.fit(
            X,
            Y,
            epochs=2,
            batch_size=32,
            verbose=0,
            callbacks=[ck.BackupAndRestore(url, double_checkpoint=True)],
        )
    assert len(history.history["loss"]) == 1  # resumed after epoch 1, from the older backup


def test_backup_needs_built_model_and_valid_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ck.BackupAndRestore("")
    with pytest.raises(ValueError):
        ck.BackupAndRestore(str(tmp_path), save_freq="often")
    model = keras.Sequential([keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    cb = ck.BackupAndRestore(str(tmp_path / "b"))
    cb.set_model(model)
    with pytest.raises(ValueError, match="built"):
        cb.on_train_begin()
