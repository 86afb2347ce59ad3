"""The Lightning callback as a drop-in: Lightning's behaviours that our class now shares
(each asserted on its result, with a real Trainer on a tiny model)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lightning")
torch = pytest.importorskip("torch")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from checkpointer.adapters.lightning import (  # noqa: E402
    ModelCheckpoint,
    SafeCheckpointIO,
    SafeLoading,
    load_from_checkpoint,
)
from checkpointer.errors import ConfigurationError  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from torch_lightning_model import TinyModule, loaders, trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _fit(root: Path, epochs: int, cb: pl.Callback, losses: list[float] | None = None,
         **kw: typing.Any) -> tuple[pl.Trainer, TinyModule]:  # fmt: skip
    pl.seed_everything(0, verbose=False)
    model = kw.pop("model", None) or TinyModule(val_losses=losses)
    ckpt_path, validate = kw.pop("ckpt_path", None), kw.pop("validate", True)
    t = trainer(str(root), epochs, [cb, *kw.pop("extra", [])], **kw)
    train, val = loaders()
    t.fit(model, train, val if validate else None, ckpt_path=ckpt_path)
    return t, model


class _Boom(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("boom")


def test_save_on_exception_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_on_exception=True, save_top_k=0)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, 3, cb, extra=[_Boom()])
    path = tmp_path / "ck" / "epoch=1-step=4.ckpt"  # named as Lightning names it
    assert sorted(os.listdir(tmp_path / "ck")) == [path.name]
    assert SafeCheckpointIO().load_checkpoint(path)["global_step"] == 4


def test_dirpath_lists_only_checkpoints_and_a_rerun_gets_version_names(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    first = ModelCheckpoint(dirpath=ck, monitor="val_loss", save_top_k=1)
    _fit(tmp_path, 2, first, [0.1, 0.2])
    assert os.listdir(ck) == ["epoch=0-step=4.ckpt"]  # no index or other file of ours
    second = ModelCheckpoint(dirpath=ck, monitor="val_loss", save_top_k=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, 2, second, [0.9, 0.8])  # a weaker, fresh run in the same folder
    assert any("exists and is not empty" in str(w.message) for w in caught)
    # the earlier run's file is kept; the new run is ranked alone and named -v1 on a clash
    assert sorted(os.listdir(ck)) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    assert second.best_model_path == str(ck / "epoch=1-step=8.ckpt")
    assert float(second.best_model_score) == pytest.approx(0.8)
    third = ModelCheckpoint(dirpath=ck, monitor="val_loss", save_top_k=1)
    _fit(tmp_path, 1, third, [0.5])
    assert third.best_model_path == str(ck / "epoch=0-step=4-v1.ckpt")


def test_a_monitor_never_logged_raises_as_lightning() -> None:
    cb = ModelCheckpoint(monitor="nope")
    with pytest.raises(MisconfigurationException, match="nope"):
        _fit(Path(os.environ.get("TMPDIR", "/tmp")) / f"never-{os.getpid()}", 1, cb)


@pytest.mark.parametrize(("mode", "expected"), [("min", math.inf), ("max", -math.inf)])
def test_a_nan_score_is_ranked_as_the_worst(tmp_path: Path, mode: str, expected: float) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", mode=mode, save_top_k=1)
    _fit(tmp_path, 1, cb, [math.nan])
    assert float(cb.best_model_score) == expected


def test_monitor_step_with_step_saves_and_no_validation(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="step", mode="max", save_top_k=2,
                         every_n_train_steps=3)  # fmt: skip
    _fit(tmp_path, 2, cb, validate=False, limit_val_batches=0)
    assert sorted(os.listdir(tmp_path / "ck")) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]
    assert cb.best_model_path.endswith("step=6.ckpt")


def test_top_k_minus_one_has_a_kth_best(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", save_top_k=-1)
    _fit(tmp_path, 3, cb, [0.3, 0.1, 0.2])
    assert cb.kth_best_model_path == str(tmp_path / "ck" / "epoch=0-step=4.ckpt")
    assert len(cb.best_k_models) == 3


def test_to_yaml_and_real_annotations(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", save_top_k=2)
    _fit(tmp_path, 2, cb, [0.2, 0.1])
    cb.to_yaml()
    text = (tmp_path / "ck" / "best_k_models.yaml").read_text()
    assert "epoch=1-step=8.ckpt" in text and "0.1" in text
    hints = typing.get_type_hints(ModelCheckpoint.__init__)  # what LightningCLI reads
    assert hints["save_top_k"] is int and hints["save_on_exception"] is bool


def test_a_changed_dirpath_warns_and_keeps_only_the_best_path(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val_loss", save_last=True)
    _fit(tmp_path, 1, cb, [0.5])
    moved = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val_loss", save_last=True)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        _fit(tmp_path, 2, moved, [0.5, 0.4], ckpt_path=cb.last_model_path)
    assert (tmp_path / "a" / "last.ckpt").is_dir()  # the resumed-from folder is kept


def test_the_checkpoint_resumed_from_is_never_deleted(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _fit(tmp_path, 1, ModelCheckpoint(dirpath=ck, monitor="val_loss"), [0.5])
    cb = ModelCheckpoint(dirpath=ck, monitor="val_loss")
    _fit(tmp_path, 3, cb, [0.5, 0.2, 0.1], ckpt_path=ck / "epoch=0-step=4.ckpt")
    # top 1 moved on twice; the folder this fit resumed from stays, the one it replaced goes
    assert sorted(os.listdir(ck)) == ["epoch=0-step=4.ckpt", "epoch=2-step=12.ckpt"]


def test_last_name_fields_and_file_extension_resume_from_last(tmp_path: Path) -> None:
    def make(name: str) -> ModelCheckpoint:
        cb = ModelCheckpoint(dirpath=tmp_path / name, monitor="val_loss", save_last=True)
        cb.FILE_EXTENSION = ".tpkc"
        return cb

    named = make("named")
    named.CHECKPOINT_NAME_LAST = "{epoch}-last"
    _fit(tmp_path, 2, named, [0.3, 0.2])
    assert sorted(os.listdir(tmp_path / "named")) == ["epoch=1-last.tpkc", "epoch=1-step=8.tpkc"]
    _fit(tmp_path, 2, make("ext"), [0.3, 0.2])
    epochs: list[int] = []

    class Seen(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            epochs.append(trainer.current_epoch)

    _fit(tmp_path, 3, make("ext"), [0.3, 0.2, 0.1], extra=[Seen()], ckpt_path="last")
    assert epochs == [2]  # resumed from ext/last.tpkc


def test_a_dot_name_round_trips_through_the_plugin(tmp_path: Path) -> None:
    io = SafeCheckpointIO()  # ddp_spawn hands back the weights as .temp.ckpt
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / ".temp.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / ".temp.ckpt")["state_dict"]["w"],
                       torch.ones(2))  # fmt: skip
    io.remove_checkpoint(tmp_path / ".temp.ckpt")
    assert os.listdir(tmp_path) == []


class _Loadable(SafeLoading, TinyModule):
    pass


def test_load_from_checkpoint_function_and_mixin(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss")
    _, model = _fit(tmp_path, 2, cb, [0.2, 0.3], model=_Loadable(val_losses=[0.2, 0.3], lr=0.01))
    for loaded in (load_from_checkpoint(_Loadable, cb.best_model_path, lr=0.5),
                   _Loadable.load_from_checkpoint(cb.best_model_path, lr=0.5)):  # fmt: skip
        assert isinstance(loaded, _Loadable) and loaded.hparams.lr == 0.5
        best = SafeCheckpointIO().load_checkpoint(cb.best_model_path)["state_dict"]
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, best[name]), name


class _OtherIO(TorchCheckpointIO):
    pass


def test_a_foreign_checkpoint_io_is_refused_and_async_is_honoured(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck")
    with pytest.raises(ConfigurationError, match="_OtherIO"):
        _fit(tmp_path, 1, cb, plugins=[_OtherIO()])
    cb = ModelCheckpoint(dirpath=tmp_path / "ck2", monitor="val_loss", save_top_k=1, save_last=True)
    t, _ = _fit(tmp_path, 3, cb, [0.3, 0.2, 0.1], plugins=[AsyncCheckpointIO()])
    io = t.strategy.checkpoint_io
    assert isinstance(io, AsyncCheckpointIO) and isinstance(io.checkpoint_io, SafeCheckpointIO)
    io.teardown()  # the writer thread has finished
    assert sorted(os.listdir(tmp_path / "ck2")) == ["epoch=2-step=12.ckpt", "last.ckpt"]
    cb2 = ModelCheckpoint(dirpath=tmp_path / "ck2", monitor="val_loss", save_top_k=1)
    t2, _ = _fit(tmp_path, 4, cb2, [0.3, 0.2, 0.1, 0.05], plugins=[AsyncCheckpointIO()],
                 ckpt_path="last")  # fmt: skip
    assert t2.global_step == 16


def test_ls_shows_the_last_checkpoint_with_step_epoch_and_metrics(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", save_last=True)
    _fit(tmp_path, 2, cb, [0.4, 0.3])
    out = subprocess.run([sys.executable, "-m", "checkpointer", "ls", "--json",
                          str(tmp_path / "ck")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)["checkpoints"]}
    assert set(rows) == {"epoch=1-step=8.ckpt", "last.ckpt"}
    last = rows["last.ckpt"]
    assert (last["step"], last["epoch"]) == (8, 1)
    assert last["metrics"]["val_loss"] == pytest.approx(0.3)


@pytest.mark.slow
def test_ddp_spawn_finishes_and_hands_back_the_weights(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", save_top_k=1)
    with pytest.raises(Exception, match=r"plugins=\[SafeCheckpointIO\(\)\]"):
        _fit(tmp_path, 2, cb, [0.2, 0.3], strategy="ddp_spawn", devices=2)  # no plugin: refused
    t, model = _fit(tmp_path, 2, cb, [0.2, 0.3], strategy="ddp_spawn", devices=2,
                    num_sanity_val_steps=0, plugins=[SafeCheckpointIO()])  # fmt: skip
    assert os.listdir(tmp_path / "ck") == ["epoch=0-step=2.ckpt"]
    best = SafeCheckpointIO().load_checkpoint(tmp_path / "ck" / "epoch=0-step=2.ckpt")
    assert best["global_step"] == 2 and t.state.finished
    pl.seed_everything(0, verbose=False)
    untrained = TinyModule(val_losses=[0.2, 0.3])
    assert not torch.equal(model.net[0].weight, untrained.net[0].weight)  # trained weights, back
    assert not [n for n in os.listdir(tmp_path) if "temp" in n]  # the hand-over folder removed
