"""Fresh and resumed runs, the command line on Keras files, remote Keras files: run once per
Keras backend by ``test_keras.py`` (not collected alone).

A fresh run in a folder holding an earlier run's best file replaces it, as Keras does; a run
resumed by ``BackupAndRestore`` keeps the best of the run it continues; ``checkpointer ls`` /
``verify`` / ``inspect`` see the Keras files; ``local_copy`` fetches one from a remote store.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import keras
import numpy as np
import pytest
from keras_lib import BATCH, Interrupt, Recorder, assert_same, data, make_model, weights

from checkpointer.adapters import keras as ck
from checkpointer.cli import main
from checkpointer.errors import ChecksumMismatchError

X, Y, XV, YV = data()


def fit(model: keras.Model, callbacks: list, epochs: int, **kw: object) -> keras.callbacks.History:
    return model.fit(X, Y, epochs=epochs, batch_size=BATCH, validation_data=(XV, YV),
                     shuffle=False, verbose=0, callbacks=callbacks, **kw)  # fmt: skip


def best_cb(path: Path | str) -> ck.ModelCheckpoint:
    return ck.ModelCheckpoint(path, save_best_only=True, save_weights_only=True)


def test_fresh_fit_replaces_an_earlier_experiments_best(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "best_model.weights.h5"
    good = Recorder()
    fit(make_model(lr=0.05), [best_cb(path), good], epochs=4)
    weak = make_model(seed=4, lr=1e-6)  # barely learns: worse than the earlier run
    rec = Recorder()
    cb = best_cb(path)
    with caplog.at_level("INFO", logger="checkpointer"):
        fit(weak, [cb, rec], epochs=2)
    losses = [r["val_loss"] for r in rec.logs]
    assert min(losses) > min(r["val_loss"] for r in good.logs)
    assert cb.best == pytest.approx(min(losses))
    loaded = make_model(seed=9)
    loaded.load_weights(path)  # this run's best, not the earlier experiment's
    assert_same(weights(loaded), rec.weights[int(np.argmin(losses))])
    assert "does not resume" in caplog.text


@pytest.mark.parametrize("stop", [(2, None), (1, 2)])  # at an epoch's start, mid-epoch
def test_backup_and_restore_resume_keeps_the_best(tmp_path: Path, stop: tuple) -> None:
    path, backup = tmp_path / "best.weights.h5", str(tmp_path / "backup")
    first = Recorder()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(make_model(), [ck.BackupAndRestore(backup, save_freq=1), best_cb(path), first,
                           Interrupt(*stop)], epochs=4)  # fmt: skip
    done = [r["val_loss"] for r in first.logs]
    before = path.read_bytes() if path.exists() else None
    cb = best_cb(path)
    # listed before BackupAndRestore: its manager opens once every on_train_begin has run
    rec = Recorder()
    fit(make_model(seed=7), [cb, ck.BackupAndRestore(backup, save_freq=1), rec], epochs=4)
    now = [r["val_loss"] for r in rec.logs]
    assert cb.best == pytest.approx(min(done + now))
    if done and min(done) <= min(now):
        assert path.read_bytes() == before  # the resumed run did not beat the earlier epochs


def test_a_mid_epoch_restore_in_the_first_epoch_is_a_resume(tmp_path: Path) -> None:
    path, backup = tmp_path / "best.weights.h5", str(tmp_path / "backup")
    early = best_cb(path)  # the part of this run before the crash: a best no epoch here beats
    early.set_model(make_model())
    early.on_train_begin()
    early.on_epoch_begin(0)
    early.on_epoch_end(0, {"val_loss": 1e-9})
    early.on_train_end()
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(make_model(), [ck.BackupAndRestore(backup, save_freq=1), Interrupt(0, 2)], epochs=2)
    cb = best_cb(path)  # epoch 0 again, but BackupAndRestore restored: a resume
    fit(make_model(seed=7), [cb, ck.BackupAndRestore(backup, save_freq=1)], epochs=2)
    assert cb.best == 1e-9 and path.read_bytes() == before
    fresh = best_cb(path)  # no restore, initial_epoch=0: a fresh run replaces it
    fit(make_model(seed=7), [fresh], epochs=1)
    assert fresh.best is not None and fresh.best > 1e-9 and path.read_bytes() != before


def test_command_line_sees_the_keras_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cb = ck.ModelCheckpoint(str(tmp_path / "m{epoch:02d}.keras"), monitor="val_loss")
    rec = Recorder()
    fit(make_model(), [cb, rec], epochs=3)
    capsys.readouterr()
    assert main(["ls", str(tmp_path), "--json", "--monitor", "val_loss"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["name"] for r in rows] == ["m01.keras", "m02.keras", "m03.keras"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    best = int(np.argmin([r["val_loss"] for r in rec.logs]))
    assert [r["best"] for r in rows] == [i == best for i in range(3)]
    assert rows[0]["metrics"]["val_loss"] == pytest.approx(rec.logs[0]["val_loss"])
    assert main(["verify", str(tmp_path)]) == 0
    assert "3 verified, 0 failed" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "m02.keras")]) == 0
    assert "1 file: m02.keras" in capsys.readouterr().out
    damaged = bytearray((tmp_path / "m01.keras").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (tmp_path / "m01.keras").write_bytes(bytes(damaged))
    assert main(["verify", str(tmp_path / "m01.keras")]) == 1


def test_local_copy_of_a_remote_keras_file() -> None:
    url = f"memory://keras-copy-{keras.backend.backend()}/best.weights.h5"
    rec = Recorder()
    fit(make_model(), [best_cb(url), rec], epochs=3)
    with ck.local_copy(url) as path:
        loaded = make_model(seed=2)
        loaded.load_weights(path)
        assert Path(path).exists()
    assert not Path(path).exists()
    assert_same(weights(loaded), rec.weights[int(np.argmin([r["val_loss"] for r in rec.logs]))])
    fs = fsspec.filesystem("memory")
    damaged = bytearray(fs.cat_file(url))
    damaged[len(damaged) // 2] ^= 1
    fs.pipe_file(url, bytes(damaged))
    with pytest.raises(ChecksumMismatchError), ck.local_copy(url):
        pass


def test_backup_and_restore_save_freq_message_is_keras() -> None:
    for bad in ("batch", 0.15):
        with pytest.raises(ValueError, match="Invalid value for argument `save_freq`"):
            ck.BackupAndRestore("backup_dir", save_freq=bad)
