"""checkpointer.adapters.lightning with a real Lightning Trainer on a tiny model."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lightning")
torch = pytest.importorskip("torch")

import lightning.pytorch as pl  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.adapters.lightning import (  # noqa: E402
    ModelCheckpoint,
    SafeCheckpointIO,
    encode_checkpoint,
)
from checkpointer.errors import ConfigurationError, StateTreeError  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from torch_lightning_model import TinyModule, loaders, trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
LOSSES = [0.5, 0.3, 0.4, 0.2, 0.6]


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _fit(root: Path, epochs: int, cb: pl.Callback, losses: list[float] = LOSSES, **kw) -> tuple:
    pl.seed_everything(0, verbose=False)
    model = TinyModule(val_losses=losses)
    ckpt_path = kw.pop("ckpt_path", None)
    t = trainer(str(root), epochs, [cb, *kw.pop("extra", [])], **kw)
    train, val = loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, model


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_top_k_and_last_files_and_attributes(tmp_path: Path, async_save: bool) -> None:
    cb = ModelCheckpoint(
        dirpath=tmp_path / "ck",
        monitor="val_loss",
        save_top_k=2,
        save_last=True,
        async_save=async_save,
    )
    t, model = _fit(tmp_path, 5, cb)
    ck = tmp_path / "ck"
    assert _names(ck) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"]
    assert t.checkpoint_callback is cb
    assert cb.best_model_path == str(ck / "epoch=3-step=16.ckpt")
    assert float(cb.best_model_score) == pytest.approx(0.2)
    assert {k: round(float(v), 6) for k, v in cb.best_k_models.items()} == {
        str(ck / "epoch=3-step=16.ckpt"): 0.2,
        str(ck / "epoch=1-step=8.ckpt"): 0.3,
    }
    assert cb.kth_best_model_path == str(ck / "epoch=1-step=8.ckpt")
    assert float(cb.kth_value) == pytest.approx(0.3)
    assert cb.last_model_path == str(ck / "last.ckpt")
    assert float(cb.current_score) == pytest.approx(0.2)  # the last score admitted, as Lightning

    best = SafeCheckpointIO().load_checkpoint(cb.best_model_path)
    assert best["epoch"] == 3 and best["global_step"] == 16
    last = SafeCheckpointIO().load_checkpoint(cb.last_model_path)
    assert last["epoch"] == 3  # Lightning 2.6 writes last.ckpt only at points that saved
    for name, tensor in best["state_dict"].items():
        assert torch.equal(last["state_dict"][name], tensor), name
    # the callback state inside a checkpoint is that save's own, not the one before
    state = best["callbacks"][cb.state_key]
    assert state["best_model_path"] == cb.best_model_path
    assert float(state["current_score"]) == pytest.approx(0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.validate(model, loaders()[1], ckpt_path="best", verbose=False)  # read through the plugin


class _Crash(pl.Callback):
    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.at_epoch:
            raise RuntimeError("simulated crash")


class _Epochs(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen.append(trainer.current_epoch)


def test_interrupted_run_resumes_from_last_and_keeps_its_best(tmp_path: Path) -> None:
    losses = [0.5, 0.2, 0.4, 0.45, 0.3]
    make = lambda: ModelCheckpoint(  # noqa: E731
        dirpath=tmp_path / "ck", monitor="val_loss", save_top_k=2, save_last=True
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, 5, make(), losses, extra=[_Crash(3)])
    ck = tmp_path / "ck"
    assert _names(ck) == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]

    cb, epochs = make(), _Epochs()
    t, _ = _fit(tmp_path, 5, cb, losses, extra=[epochs], ckpt_path="last")
    assert epochs.seen == [3, 4]
    assert _names(ck) == ["epoch=1-step=8.ckpt", "epoch=4-step=20.ckpt", "last.ckpt"]
    assert cb.best_model_path == str(ck / "epoch=1-step=8.ckpt")
    assert float(cb.best_model_score) == pytest.approx(0.2)
    assert sorted(round(float(v), 6) for v in cb.best_k_models.values()) == [0.2, 0.3]
    assert t.global_step == 20


def test_every_n_train_steps(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    _fit(tmp_path, 2, cb)
    assert _names(tmp_path / "ck") == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]
    assert cb.best_model_path == str(tmp_path / "ck" / "epoch=1-step=6.ckpt")


class _FakeClock(pl.Callback):
    """Time advances 10 s per training batch."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, *args: object) -> None:
        self.now += 10.0


def test_train_time_interval_with_a_fake_clock(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.callbacks import model_checkpoint

    clock = _FakeClock()
    monkeypatch.setattr(model_checkpoint, "time", SimpleNamespace(monotonic=clock))  # its timer
    cb = ModelCheckpoint(
        dirpath=tmp_path / "ck",
        train_time_interval=timedelta(seconds=25),
        save_top_k=-1,
        filename="{step}",
    )
    _fit(tmp_path, 2, cb, extra=[clock])
    assert _names(tmp_path / "ck") == ["step=3.ckpt", "step=6.ckpt"]


def test_only_one_save_with_monitor_none_and_top_1(tmp_path: Path) -> None:
    cb = ModelCheckpoint(
        dirpath=tmp_path / "ck", filename="m-{epoch}", auto_insert_metric_name=False
    )
    _fit(tmp_path, 3, cb)
    assert _names(tmp_path / "ck") == ["m-2.ckpt"]
    assert cb.best_model_path == str(tmp_path / "ck" / "m-2.ckpt")


def test_safe_checkpoint_io_round_trip_and_resume(tmp_path: Path) -> None:
    t, model = _fit(
        tmp_path, 1, ModelCheckpoint(dirpath=tmp_path / "ck"), plugins=[SafeCheckpointIO()]
    )
    path = tmp_path / "manual.ckpt"
    t.save_checkpoint(path)
    assert (path / "manifest.msgpack").exists()
    ckpt = SafeCheckpointIO().load_checkpoint(path)
    assert (
        ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    )  # saved after the epoch completed and ckpt["hyper_parameters"]["lr"] == 0.05
    assert list(ckpt["optimizer_states"][0]["state"]) == [0, 1, 2, 3]
    assert ckpt["optimizer_states"][0]["state"][0]["exp_avg"].dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][name], tensor)
    assert isinstance(checkpointer.load(path), dict)  # plain format, readable by the core

    epochs = _Epochs()
    t2, _ = _fit(
        tmp_path,
        2,
        ModelCheckpoint(dirpath=tmp_path / "ck2"),
        extra=[epochs],
        plugins=[SafeCheckpointIO()],
        ckpt_path=str(path),
    )
    assert epochs.seen == [1] and t2.global_step == 8

    model.hparams.args = argparse.Namespace(depth=3)
    with pytest.raises(StateTreeError, match=r"\['hyper_parameters'\]\['args'\].*Namespace"):
        t.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_encode_checkpoint_keeps_int_keys_and_refuses_objects() -> None:
    tree = encode_checkpoint({"optimizer_states": [{"state": {0: {"step": torch.tensor(1.0)}}}]})
    assert tree["optimizer_states"][0]["state"]["__torch__"] == {"int_keys": ["0"]}
    with pytest.raises(StateTreeError, match=r"\['callbacks'\]\['X'\]"):
        encode_checkpoint({"callbacks": {"X": object()}})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"save_top_k": -2},
        {"mode": "auto"},
        {"save_top_k": 3},  # no monitor to rank by
        {"every_n_train_steps": 2, "every_n_epochs": 1},
        {"every_n_epochs": -1},
        {"async_save": "yes"},
    ],
)
def test_bad_options_fail_at_construction(kwargs: dict) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(ConfigurationError) as info:
        ModelCheckpoint(**kwargs)
    assert isinstance(info.value, MisconfigurationException)  # what Lightning users catch
    assert isinstance(info.value, ValueError)


def _script():
    spec = importlib.util.spec_from_file_location(
        "torch_lightning_resume", HERE / "torch_lightning_resume.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_resumes_bit_for_bit_in_a_fresh_process(tmp_path: Path) -> None:
    from test_torch_resume import assert_bit_identical

    script = _script()
    script.main("full", str(tmp_path / "a"), str(tmp_path / "full"), 4)
    script.main("first", str(tmp_path / "b"), str(tmp_path / "half"), 4)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "torch_lightning_resume.py"),
            "resume",
            str(tmp_path / "b"),
            str(tmp_path / "resumed"),
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_bit_identical(
        checkpointer.load(tmp_path / "full"), checkpointer.load(tmp_path / "resumed")
    )


def test_save_weights_only_leaves_out_training_state(tmp_path: Path) -> None:
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_weights_only=True, save_last=True)
    _, model = _fit(tmp_path, 1, cb)
    ckpt = SafeCheckpointIO().load_checkpoint(cb.last_model_path)
    assert "optimizer_states" not in ckpt and "callbacks" not in ckpt
    assert torch.equal(ckpt["state_dict"]["net.0.weight"], model.net[0].weight)


@pytest.mark.slow
def test_ddp_rank_zero_writes_and_every_rank_agrees(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "torch_lightning_ddp.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    expected = ["epoch=1-step=4.ckpt", "epoch=3-step=8.ckpt"]
    assert reports[0]["files"] == [*expected, "last.ckpt"]
    for r in reports:
        assert r["best"] == str(tmp_path / "ck" / "epoch=3-step=8.ckpt")
        assert (
            r["score"] == pytest.approx(0.2) and r["top"] == expected and r["last"] == "last.ckpt"
        )


def test_lightnings_own_model_checkpoint_writes_and_resumes_through_the_plugin(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

    make = lambda: LightningModelCheckpoint(  # noqa: E731
        dirpath=tmp_path / "ck", monitor="val_loss", save_top_k=2, save_last=True
    )
    cb = make()
    _fit(tmp_path, 3, cb, plugins=[SafeCheckpointIO()])
    assert _names(tmp_path / "ck") == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]
    assert (tmp_path / "ck" / "last.ckpt" / "manifest.msgpack").exists()  # our format, a folder
    epochs, cb2 = _Epochs(), make()
    _fit(tmp_path, 5, cb2, extra=[epochs], plugins=[SafeCheckpointIO()], ckpt_path="last")
    assert epochs.seen == [3, 4]
    assert cb2.best_model_path.endswith("epoch=3-step=16.ckpt")


def test_fsspec_url_dirpath_saves_and_resumes_from_last(tmp_path: Path) -> None:
    import fsspec

    url = f"memory://{tmp_path.name}/ck"
    make = lambda: ModelCheckpoint(dirpath=url, monitor="val_loss", save_top_k=2, save_last=True)  # noqa: E731
    cb = make()
    _fit(tmp_path, 3, cb)
    listed = fsspec.filesystem("memory").ls(f"/{tmp_path.name}/ck", detail=False)
    assert sorted(p.rsplit("/", 1)[1] for p in listed) == [
        "epoch=1-step=8.ckpt",
        "epoch=2-step=12.ckpt",
        "last.ckpt",
    ]
    assert (
        cb.best_model_path == f"{url}/epoch=1-step=8.ckpt"
        and cb.last_model_path == f"{url}/last.ckpt"
    )
    epochs, cb2 = _Epochs(), make()
    _fit(tmp_path, 4, cb2, extra=[epochs], ckpt_path="last")
    assert epochs.seen == [3] and cb2.best_model_path == f"{url}/epoch=3-step=16.ckpt"
