"""ModelCheckpoint cases, run once per Keras backend by ``test_keras.py`` (not collected alone).

The two examples of docs/keras.md must give Keras's own file names and the best epoch's weights; the
four ways Keras's own callback misbehaves (save-best with an integer ``save_freq``, a NaN
first value, a missing metric, a restarted run) must each be handled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import fsspec
import keras
import numpy as np
import pytest
from keras_lib import BATCH, EPOCHS, Recorder, assert_same, data, make_model, perturb, weights

import checkpointer
from checkpointer import CheckpointManager, CheckpointWarning
from checkpointer.adapters import keras as ck

X, Y, XV, YV = data()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def engine_files(names: list[str]) -> list[str]:
    """The engine's hidden files among ``names``: each Keras file's manifest, the index."""
    return [n for n in names if Path(n).name.startswith(".")]


def listing(root: str) -> list[str]:
    fs, base = fsspec.core.url_to_fs(root)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))


def run_examples(module, root: Path, monkeypatch: pytest.MonkeyPatch):
    """The issue's two examples, verbatim but for where ModelCheckpoint comes from."""
    root.mkdir()
    monkeypatch.chdir(root)
    ModelCheckpoint = module.ModelCheckpoint  # noqa: N806 - the example's own spelling
    model = make_model()
    recorder = Recorder()
    model_checkpoint_callback = ModelCheckpoint(filepath='best_model.weights.h5', save_weights_only=True, monitor='val_loss', mode='min', save_best_only=True)  # fmt: skip
    epoch_callback = ModelCheckpoint(filepath='checkpoints/model_epoch_{epoch:02d}.keras', save_weights_only=False, monitor='val_accuracy', mode='max', save_best_only=False, save_freq='epoch')  # fmt: skip
    model.fit(X, Y, epochs=EPOCHS, batch_size=BATCH, validation_data=(XV, YV),
              callbacks=[model_checkpoint_callback, epoch_callback, recorder], verbose=0)  # fmt: skip
    model.load_weights('best_model.weights.h5')  # fmt: skip
    return files_under(root), weights(model), recorder


def test_examples_match_keras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs, their_best, their_rec = run_examples(keras.callbacks, tmp_path / "keras", monkeypatch)
    ours, our_best, rec = run_examples(ck, tmp_path / "ours", monkeypatch)
    hidden = engine_files(ours)
    assert [f for f in ours if f not in hidden] == theirs
    assert sorted(hidden) == sorted(
        [".ckpt-index.msgpack", "checkpoints/.ckpt-index.msgpack"]
        + [str(Path(f).parent / f".{Path(f).name}.ckpt-manifest").removeprefix("./") for f in theirs]
    )
    losses = [r["val_loss"] for r in rec.logs]
    best_epoch = int(np.argmin(losses))
    assert best_epoch < EPOCHS - 1, f"the data no longer makes val_loss rise: {losses}"
    assert_same(our_best, rec.weights[best_epoch])
    assert_same(
        their_best, their_rec.weights[int(np.argmin([r["val_loss"] for r in their_rec.logs]))]
    )
    for name in (f for f in theirs if f.endswith(".keras")):
        mine = keras.models.load_model(tmp_path / "ours" / name)
        keras_own = keras.models.load_model(tmp_path / "keras" / name)
        epoch = int(name[-8:-6]) - 1
        assert_same(weights(mine), rec.weights[epoch])
        assert_same(weights(mine), weights(keras_own), rtol=1e-5)


@pytest.mark.parametrize("name", ["w.weights.h5", "m.keras"])
def test_remote_store_keras_files(name: str) -> None:
    url = f"memory://keras-{keras.backend.backend()}-{name.split('.')[0]}/{name}"
    model = make_model()
    rec = Recorder()
    cb = ck.ModelCheckpoint(
        url, save_best_only=True, save_weights_only=name.endswith(".weights.h5")
    )
    model.fit(
        X, Y, epochs=3, batch_size=32, validation_data=(XV, YV), callbacks=[cb, rec], verbose=0
    )
    fs = fsspec.filesystem("memory")
    parent = url.rsplit("/", 1)[0]
    assert listing(parent) == sorted([name, f".{name}.ckpt-manifest", ".ckpt-index.msgpack"])
    # no temporary names left behind
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"fetched-{os.getpid()}-{name}"
    local.write_bytes(fs.cat_file(url))
    best = int(np.argmin([r["val_loss"] for r in rec.logs]))
    if name.endswith(".keras"):
        loaded = keras.models.load_model(local)
    else:
        loaded = make_model(seed=1)
        loaded.load_weights(local)
    local.unlink()
    assert_same(weights(loaded), rec.weights[best])


def drive(
    cb: ck.ModelCheckpoint, model: keras.Model, values: list[float | None], start: int = 0
) -> list[list]:
    """Call the epoch hooks directly with the given val_loss values (None: missing), from epoch
    ``start`` (``initial_epoch``); the model's weights are shifted before each epoch so every
    save is recognisable. Returns the weights at each epoch end."""
    cb.set_model(model)
    cb.on_train_begin()
    seen = []
    for epoch, value in enumerate(values, start):
        perturb(model, 1.0)
        cb.on_epoch_begin(epoch)
        logs = {"loss": 1.0} if value is None else {"loss": 1.0, "val_loss": value}
        cb.on_epoch_end(epoch, logs)
        seen.append(weights(model))
    cb.on_train_end()
    return seen


def saved(path: str) -> list:
    """The weights stored at ``path`` (a Keras file, or a checkpoint in this project's format)."""
    model = make_model(seed=3)
    if path.endswith(".safetensors"):
        ck.load_state(model, checkpointer.load(path))
    else:
        model.load_weights(path)
    return weights(model)


FORMATS = {"keras-file": "best.weights.h5", "ours": "best.safetensors"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_nan_first_value_does_not_block_later_saves(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / FORMATS[fmt])
    cb = ck.ModelCheckpoint(path, save_best_only=True, save_weights_only=True)
    seen = drive(cb, make_model(), [math.nan, 0.5, 0.7, 0.4, math.nan])
    assert cb.best == 0.4  # Keras keeps best=nan and never saves again
    assert_same(saved(path), seen[3])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_missing_metric_warns_and_keeps_best(tmp_path: Path, fmt: str) -> None:
    path = str(tmp_path / FORMATS[fmt])
    cb = ck.ModelCheckpoint(path, save_best_only=True, save_weights_only=True)
    with pytest.warns(CheckpointWarning, match="val_loss"):
        seen = drive(cb, make_model(), [0.5, None, 0.6])
    assert cb.best == 0.5  # Keras saves anyway, overwriting the best with an unranked model
    assert_same(saved(path), seen[0])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fresh_run_replaces_and_resumed_run_keeps_the_best(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / FORMATS[fmt])

    def new_cb() -> ck.ModelCheckpoint:
        return ck.ModelCheckpoint(path, save_best_only=True, save_weights_only=True)

    drive(new_cb(), make_model(), [0.5, 0.3])
    fresh = new_cb()
    with caplog.at_level("INFO", logger="checkpointer"):
        seen = drive(fresh, make_model(seed=5), [0.6, 0.7])  # a new run, weaker: as in Keras
    assert fresh.best == 0.6
    assert_same(saved(path), seen[0])
    assert "does not resume" in caplog.text and "val_loss=0.3" in caplog.text
    resumed = new_cb()
    drive(resumed, make_model(seed=6), [0.65], start=2)  # initial_epoch=2: the run goes on
    assert resumed.best == 0.6  # 0.65 does not beat the best of the run it resumes
    assert_same(saved(path), seen[0])


@pytest.mark.parametrize("suffix", [".weights.h5", ""])
def test_save_best_with_integer_save_freq(tmp_path: Path, suffix: str) -> None:
    path = str(tmp_path / f"b{{epoch}}-{{batch}}{suffix}")
    cb = ck.ModelCheckpoint(path, monitor="loss", save_best_only=True, save_weights_only=True,
                            save_freq=3)  # fmt: skip
    rec = Recorder()
    make_model().fit(X, Y, epochs=2, batch_size=BATCH, callbacks=[cb, rec], verbose=0)
    at_saves = [logs["loss"] for i, logs in enumerate(rec.batch_logs) if (i + 1) % 3 == 0]
    assert cb.best == pytest.approx(min(at_saves), rel=1e-6)  # Keras raises TypeError instead
    names = sorted(p.name for p in tmp_path.glob("b*"))
    assert names[0] == f"b1-3{suffix}"  # {epoch}, {batch} 1-based as in Keras
    assert len(names) == 1 + (at_saves[1] < at_saves[0])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_failed_write_leaves_the_previous_file(tmp_path: Path, where: str) -> None:
    root = str(tmp_path) if where == "local" else f"memory://fail-{keras.backend.backend()}"
    path = f"{root}/best.weights.h5"
    model = make_model()
    cb = ck.ModelCheckpoint(path, save_best_only=True, save_weights_only=True)
    seen = drive(cb, model, [0.5])
    real = model.save_weights

    def torn(filepath: str, overwrite: bool = True) -> None:
        Path(filepath).write_bytes(b"half a file")
        raise OSError("disk full")

    model.save_weights = torn
    with pytest.raises(OSError, match="disk full"):
        drive(cb, model, [0.1])
    model.save_weights = real
    assert cb.best == 0.5
    fs, base = fsspec.core.url_to_fs(root)
    assert listing(root) == [".best.weights.h5.ckpt-manifest", ".ckpt-index.msgpack",
                             "best.weights.h5"]  # no temporary files left; fmt: skip
    local = tmp_path / "fetched.weights.h5"
    local.write_bytes(fs.cat_file(f"{base}/best.weights.h5"))
    assert_same(saved(str(local)), seen[0])


def test_leftovers_of_dead_writers_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from checkpointer.owners import new_owner

    host = new_owner().split(".")[0]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    dead = tmp_path / f".ckpt-tmp-m3.weights.h5-{host}.{gone}.0a1b"  # a writer killed mid-save
    live = tmp_path / f".ckpt-tmp-m4.weights.h5-{new_owner()}"  # a live writer's
    for folder in (dead, live):
        folder.mkdir()
        (folder / folder.name.split("-")[2]).write_bytes(b"half a file")
    other = tmp_path / ".unrelated.tmp-file"
    other.write_bytes(b"x")
    cb = ck.ModelCheckpoint(str(tmp_path / "m{epoch}.weights.h5"), save_weights_only=True)
    drive(cb, make_model(), [0.5])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".ckpt-index.msgpack", ".m1.weights.h5.ckpt-manifest", "m1.weights.h5",
                           live.name, other.name])  # fmt: skip


def test_keep_last_and_keep_best_with_record(tmp_path: Path) -> None:
    path = str(tmp_path / "m{epoch}.weights.h5")
    cb = ck.ModelCheckpoint(path, save_weights_only=True, keep_last=1, keep_best=1)
    seen = drive(cb, make_model(), [0.5, 0.3, 0.4, 0.6])
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["m2.weights.h5", "m4.weights.h5"]
    assert_same(saved(str(tmp_path / "m2.weights.h5")), seen[1])
    assert sorted(p.name for p in tmp_path.glob(".m*")) == [
        ".m2.weights.h5.ckpt-manifest", ".m4.weights.h5.ckpt-manifest"]  # fmt: skip


def test_async_save_keras_file(tmp_path: Path) -> None:
    path = str(tmp_path / "a.weights.h5")
    cb = ck.ModelCheckpoint(path, save_best_only=True, save_weights_only=True, async_save=True)
    seen = drive(cb, make_model(), [0.5, 0.2, 0.9])
    assert_same(saved(path), seen[1])
    assert listing(str(tmp_path)) == [".a.weights.h5.ckpt-manifest", ".ckpt-index.msgpack",
                                      "a.weights.h5"]  # fmt: skip


def test_our_format_full_state_and_best(tmp_path: Path) -> None:
    directory = str(tmp_path / "run")
    cb = ck.ModelCheckpoint(directory, save_best_only=True, keep_best=2)
    rec = Recorder()
    model = make_model()
    model.fit(
        X, Y, epochs=4, batch_size=BATCH, validation_data=(XV, YV), callbacks=[cb, rec], verbose=0
    )
    mgr = CheckpointManager(directory, monitor="val_loss")
    best = mgr.restore("best")
    losses = [r["val_loss"] for r in rec.logs]
    assert best.info.epoch == int(np.argmin(losses)) + 1
    assert best.state["epoch"] == best.info.epoch and "optimizer" in best.state
    fresh = make_model(seed=9)
    ck.load_state(fresh, best.state)
    assert_same(weights(fresh), rec.weights[int(np.argmin(losses))])
    assert len(mgr.checkpoints) <= 2


def test_auto_mode_falls_back_to_the_compiled_metric_direction(tmp_path: Path) -> None:
    model = make_model()
    model.compile(optimizer="adam", loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="area")])  # fmt: skip
    model.evaluate(XV, YV, verbose=0)  # builds the compiled metrics
    path = str(tmp_path / "a.weights.h5")
    cb = ck.ModelCheckpoint(path, monitor="val_area", save_best_only=True, save_weights_only=True)
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, value in enumerate([0.5, 0.7, 0.6]):
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, {"val_area": value})
    assert cb.best == 0.7  # "area" says nothing by name; AUC's direction is "up"
    unknown = ck.ModelCheckpoint(path, monitor="val_thing", save_best_only=True)
    unknown.set_model(model)
    with pytest.raises(ValueError, match="mode='max'"):
        unknown.on_train_begin()


def test_verbose_messages_follow_keras(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "v.weights.h5")
    cb = ck.ModelCheckpoint(path, verbose=1, save_best_only=True, save_weights_only=True)
    drive(cb, make_model(), [0.5, 0.7])
    out = capsys.readouterr().out
    assert f"Epoch 1: val_loss improved from None to 0.50000, saving model to {path}" in out
    assert f"Epoch 1: finished saving model to {path}" in out
    assert "Epoch 2: val_loss did not improve from 0.50000" in out


@pytest.mark.parametrize("kwargs", [
    {"filepath": "x.keras", "save_weights_only": True},
    {"filepath": "x.keras", "save_freq": "batch"},
    {"filepath": "x.keras", "save_freq": 0},
    {"filepath": "x.keras", "keep_last": -1},
    {"filepath": "x.keras", "nan_policy": "ignore"},
    {"filepath": "d/{epoch}/x"},
])  # fmt: skip
def test_bad_options_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ck.ModelCheckpoint(**kwargs)
