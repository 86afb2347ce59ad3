"""``checkpointer.save`` records a step, an epoch and metrics as a manager's save does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer.api import load_with_manifest
from checkpointer.errors import ConfigurationError, MetricError


@pytest.mark.parametrize(("step", "epoch", "metrics"), [(None, None, None), (8, 1, {"val_loss": 0.25})])
def test_save_records_step_epoch_and_metrics(tmp_path: Path, step: int | None, epoch: int | None,
                                             metrics: dict[str, float] | None) -> None:
    info = checkpointer.save(tmp_path / "last.ckpt", {"w": np.ones(2)}, step=step, epoch=epoch,
                             metrics=metrics)
    assert (info.step, info.epoch, info.metrics) == (step, epoch, metrics or {})
    _, manifest = load_with_manifest(tmp_path / "last.ckpt")
    assert (manifest.get("step"), manifest.get("epoch"), dict(manifest.get("metrics"))) == (
        step, epoch, metrics or {})


@pytest.mark.parametrize(("kw", "error"), [
    ({"step": True}, ConfigurationError), ({"step": -1}, ConfigurationError), ({"epoch": 1.5}, ConfigurationError),
    ({"epoch": "3"}, ConfigurationError), ({"metrics": {"": 1.0}}, MetricError),
    ({"metrics": {"loss": object()}}, MetricError), ({"metrics": {3: 1.0}}, MetricError),
])
def test_save_refuses_fields_a_manager_would_refuse(tmp_path: Path, kw: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        checkpointer.save(tmp_path / "c", {"w": np.ones(2)}, **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_save_records_integer_metrics_as_ints(tmp_path: Path) -> None:
    info = checkpointer.save(tmp_path / "c", {"w": np.ones(2)}, metrics={"batch": 7, "loss": np.float32(0.5)})
    assert info.metrics == {"batch": 7, "loss": 0.5} and type(info.metrics["batch"]) is int
