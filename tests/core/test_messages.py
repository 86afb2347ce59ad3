"""Silent traps and error messages (issue 14): each asserts the message a user now gets, or
the behaviour that replaced a silent one."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import Checkpoint, CheckpointInfo, CheckpointManager, CheckpointWarning
from checkpointer.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    StateTreeError,
)
from checkpointer.hints import restore_not_found
from checkpointer.index import INDEX_NAME
from checkpointer.monitor import direction_error

NAN = float("nan")
LOSSES = {1: 0.5, 2: 0.3, 3: 0.4}  # epoch 2 is the best


def _monitored_run(directory: Path) -> None:
    with CheckpointManager(directory, monitor="val_loss") as mgr:
        for epoch, loss in LOSSES.items():
            mgr.epoch_end(epoch, {"w": np.full(2, epoch)}, step=10 * epoch,
                          metrics={"val_loss": loss})


# -- step_end with nothing that fires at a step ------------------------------------------


def test_step_end_without_a_step_schedule_warns_once_naming_every_n_steps(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)  # every_n_epochs=1: epochs only
    with pytest.warns(CheckpointWarning, match="every_n_steps") as record:
        assert mgr.step_end(1, {"w": np.zeros(1)}) is None
    assert len(record) == 1 and "step_end" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per manager: the second step is quiet
        assert mgr.step_end(2, {"w": np.zeros(1)}) is None
    assert mgr.checkpoints == []


@pytest.mark.parametrize("schedule", [{"every_n_steps": 2}, {"every_seconds": 3600.0}])
def test_step_end_with_a_step_or_time_schedule_does_not_warn(tmp_path: Path,
                                                             schedule: dict[str, Any]) -> None:
    mgr = CheckpointManager(tmp_path, **schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in (1, 3):
            assert mgr.step_end(step, {"w": np.zeros(1)}) is None


# -- restore("best") on a manager opened without a monitor -------------------------------


def test_restore_best_uses_the_monitor_the_index_records(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    _monitored_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="checkpointer"):
        got = CheckpointManager(tmp_path).restore("best")  # the class docstring's example
    assert got.info.epoch == 2 and got.state["w"].tolist() == [2, 2]
    assert any("'val_loss'" in r.getMessage() and "records" in r.getMessage()
               for r in caplog.records)


def test_restore_best_reads_the_manifests_when_the_index_is_gone(tmp_path: Path) -> None:
    _monitored_run(tmp_path)
    (tmp_path / INDEX_NAME).unlink()
    assert CheckpointManager(tmp_path).restore("best").info.epoch == 2


def test_a_manager_without_a_monitor_keeps_the_one_recorded(tmp_path: Path) -> None:
    _monitored_run(tmp_path)
    with CheckpointManager(tmp_path) as plain:  # saves, and rewrites the index
        plain.save({"w": np.zeros(2)}, epoch=4)
    assert CheckpointManager(tmp_path).restore("best").info.epoch == 2


def test_restore_best_with_no_monitor_anywhere_says_what_to_pass(tmp_path: Path) -> None:
    CheckpointManager(tmp_path).save({"w": np.zeros(1)}, epoch=1)
    with pytest.raises(ConfigurationError, match=r"records none.*monitor='val_loss'"):
        CheckpointManager(tmp_path).restore("best")


# -- save_best_only and a NaN ------------------------------------------------------------


def test_a_nan_under_save_best_only_warns_at_the_default_level(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", save_best_only=True)
    with caplog.at_level(logging.WARNING, logger="checkpointer"), \
            pytest.warns(CheckpointWarning, match="nan"):
        assert mgr.epoch_end(1, {"w": np.zeros(1)}, metrics={"val_loss": NAN}) is None
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "nan" in message and "save_best_only" in message and "nan_policy" in message
    assert "None" not in message


def test_not_an_improvement_names_what_it_did_not_beat(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss", save_best_only=True,
                            initial_value_threshold=0.2)
    with caplog.at_level(logging.INFO, logger="checkpointer"):
        assert mgr.epoch_end(1, {"w": np.zeros(1)}, metrics={"val_loss": 0.3}) is None
    (message,) = [r.getMessage() for r in caplog.records if "not saved" in r.getMessage()]
    assert "initial_value_threshold=0.2" in message and "None" not in message


# -- a monitor name with a typo ----------------------------------------------------------


@pytest.mark.parametrize(("typo", "meant"), [
    ("val_los", "val_loss"), ("val_acuracy", "val_accuracy"), ("los", "loss"),
    ("valloss", "val_loss"),
])
def test_a_monitor_typo_suggests_the_name_meant(tmp_path: Path, typo: str, meant: str | None) -> None:
    with pytest.raises(ConfigurationError) as err:
        CheckpointManager(tmp_path, monitor=typo)
    message = str(err.value)
    assert f"monitor {typo!r} is not a metric name whose direction is known" in message
    assert "mode='min' or mode='max'" in message
    if meant is not None:
        assert f"did you mean {meant!r}?" in message


def test_a_name_with_no_close_match_suggests_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="pass mode='min' or mode='max'") as err:
        CheckpointManager(tmp_path, monitor="zork")
    assert "did you mean" not in str(err.value)


def test_a_typo_is_matched_against_the_metrics_passed_first() -> None:
    # a callback that resolves mode="auto" at its first save knows the logged names
    message = str(direction_error("val_acurracy", seen=["val_acurracy_top5", "loss"]))
    assert "did you mean 'val_acurracy_top5'?" in message


def test_a_missing_metric_suggests_the_metrics_passed(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_acc", mode="max")
    with pytest.warns(CheckpointWarning, match="did you mean 'val_accu'"):
        mgr.epoch_end(1, {"w": np.zeros(1)}, metrics={"val_accu": 0.9, "loss": 0.1})


# -- restore of something that is not there ----------------------------------------------


def test_restore_of_a_missing_step_lists_the_steps_there(tmp_path: Path) -> None:
    _monitored_run(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint .* step 25.*10, 20, 30"):
        CheckpointManager(tmp_path).restore(25)


def test_a_long_list_of_steps_is_elided() -> None:
    infos = [CheckpointInfo(f"step-{s}", f"d/step-{s}", s, None) for s in range(100, 2100, 100)]
    message = str(restore_not_found("d", 150, infos, tried=False))
    assert "100, 200, 300, 400, ..., 1700, 1800, 1900, 2000 (20 in all)" in message


def test_restore_last_suggests_latest(tmp_path: Path) -> None:
    _monitored_run(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="did you mean 'latest'"):
        CheckpointManager(tmp_path).restore("last")


def test_restore_of_a_misspelt_name_suggests_the_name(tmp_path: Path) -> None:
    _monitored_run(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="did you mean 'step-000000020'"):
        CheckpointManager(tmp_path).restore("step-00000020")


def test_restore_best_with_nothing_ranked_says_why(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val_loss")
    with pytest.warns(CheckpointWarning, match="missing"):
        mgr.save({"w": np.zeros(1)}, epoch=1, metrics={"loss": 0.1})
    with pytest.raises(CheckpointNotFoundError, match="records the monitored metric"):
        mgr.restore("best")


def test_restore_in_an_empty_directory_says_it_is_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="holds no checkpoint"):
        CheckpointManager(tmp_path).restore()


# -- unknown keywords: Orbax, Lightning and Keras habits, typos ---------------------------


@pytest.mark.parametrize(("option", "hint"), [
    ("max_to_keep", "keep_last=3"),
    ("max_to_keep", "keep_best"),
    ("keep_period", "keep_every_n_steps=3"),
    ("keep_time_interval", "keep_every_seconds"),
    ("save_interval_steps", "every_n_steps=3"),
    ("best_fn", "monitor"),
    ("save_top_k", "keep_best=3"),
    ("keep_lst", "did you mean 'keep_last'"),
    ("every_n_step", "did you mean 'every_n_steps'"),
])
def test_an_unknown_option_names_the_real_one(tmp_path: Path, option: str, hint: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        CheckpointManager(tmp_path, **{option: 3})
    assert isinstance(err.value, TypeError)  # what Python raises for an unknown keyword
    assert f"{option}=3" in str(err.value) and hint in str(err.value)
    assert not any(tmp_path.iterdir())  # refused before anything touched the directory


def test_an_unknown_option_without_a_close_name_lists_the_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="keep_last") as err:
        CheckpointManager(tmp_path, zzz=1)
    assert "zzz=1" in str(err.value)


# -- a Checkpoint where a state belongs ----------------------------------------------------


def test_a_checkpoint_passed_as_state_says_pass_state(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "run")
    mgr.save({"w": np.zeros(2)})
    restored = mgr.restore()
    assert isinstance(restored, Checkpoint)
    for save in (lambda: mgr.save(restored), lambda: checkpointer.save(tmp_path / "one", restored),
                 lambda: mgr.save({"model": restored})):
        with pytest.raises(StateTreeError, match=r"pass its \.state"):
            save()


# -- checkpointer.load on a directory of checkpoints ---------------------------------------


def test_load_of_a_directory_of_checkpoints_names_them(tmp_path: Path) -> None:
    _monitored_run(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as err:
        checkpointer.load(tmp_path)
    message = str(err.value)
    assert "directory of checkpoints" in message
    assert all(f"step-0000000{e}0" in message for e in LOSSES)
    assert "restore" in message  # what to do instead


def test_load_of_an_empty_folder_still_says_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint"):
        checkpointer.load(tmp_path)


# -- the torch adapter ---------------------------------------------------------------------


def test_torch_to_state_names_the_key_of_an_object_without_state(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from checkpointer.adapters.torch import load_state, to_state

    model = torch.nn.Linear(2, 1)
    loader = torch.utils.data.DataLoader([1, 2, 3])
    with pytest.raises(StateTreeError, match=r"\['loader'\].*DataLoader"):
        to_state({"model": model, "loader": loader})
    checkpointer.save(tmp_path / "c", to_state({"model": model}))
    restored = Checkpoint(CheckpointInfo("c", str(tmp_path / "c"), None, None),
                          checkpointer.load(tmp_path / "c"))
    with pytest.raises(StateTreeError, match=r"pass its \.state"):
        load_state({"model": model}, restored)
    assert not load_state({"model": model}, restored.state)
