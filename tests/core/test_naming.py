"""Checkpoint names: templates with format specs, missing fields, separators in metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from checkpointer import CheckpointManager
from checkpointer.errors import ConfigurationError
from checkpointer.naming import check_name, default_name, format_name, template_fields

# (template, epoch, step, metrics, expected name)
NAMES = [
    ("epoch{epoch:02d}", 3, None, None, "epoch03"),
    (
        "epoch{epoch:02d}-val_loss{val_loss:.2f}",
        3,
        None,
        {"val_loss": 0.12345},
        "epoch03-val_loss0.12",
    ),
    ("s{step:06d}", None, 120, {}, "s000120"),
    ("{step}-{acc:.1%}", None, 5, {"acc": 0.875}, "5-87.5%"),
    ("e{epoch}_s{step}", 1, 2, None, "e1_s2"),
    ("best", None, None, None, "best"),
    ("{val/loss:.3f}", 1, None, {"val/loss": 0.5}, "0.500"),
    ("m{name}", 1, None, {"name": "a/b"}, "ma_b"),  # a separator in a value: no folder
    ("m{name}", 1, None, {"name": "a\\b"}, "ma_b"),
    ("{epoch:>4}", 7, None, None, "   7"),
]


@pytest.mark.parametrize(("template", "epoch", "step", "metrics", "name"), NAMES)
def test_format_name(
    template: str, epoch: int | None, step: int | None, metrics: dict[str, Any] | None, name: str
) -> None:
    assert format_name(template, epoch=epoch, step=step, metrics=metrics) == name


@pytest.mark.parametrize(
    ("template", "epoch", "step", "metrics"),
    [
        ("epoch{epoch}", None, 3, None),  # no epoch at a step save
        ("s{step}", 2, None, None),
        ("{val_loss:.2f}", 1, None, {"loss": 0.1}),  # metric missing
        ("{val_loss:.2f}", 1, None, {"val_loss": None}),
        ("{val_loss:d}", 1, None, {"val_loss": 0.5}),  # spec does not fit the value
    ],
)
def test_missing_field_is_configuration_error(
    template: str, epoch: int | None, step: int | None, metrics: dict[str, Any] | None
) -> None:
    with pytest.raises(ConfigurationError):
        format_name(template, epoch=epoch, step=step, metrics=metrics)


@pytest.mark.parametrize("template", ["a/{epoch}", "a\\{epoch}", "{", "{}", "{0}", "x}"])
def test_invalid_templates(template: str) -> None:
    with pytest.raises(ConfigurationError):
        template_fields(template)


def test_template_fields() -> None:
    assert template_fields("e{epoch:02d}-{val/loss:.2f}-{step}") == ["epoch", "val/loss", "step"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epoch": 3, "step": 1200, "seq": 0}, "step-000001200"),
        ({"epoch": 12, "step": None, "seq": 0}, "epoch-000012"),
        ({"epoch": None, "step": None, "seq": 7}, "save-000007"),
    ],
)
def test_default_name(kwargs: dict[str, Any], name: str) -> None:
    assert default_name(**kwargs) == name


@pytest.mark.parametrize("name", ["", ".hidden", ".ckpt-tmp-x", "a/b", "a\\b", "a\nb", "x" * 201])
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(ConfigurationError):
        check_name(name)


def test_metric_with_slash_creates_no_folder(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="val/loss", filename="e{epoch}-{val/loss:.2f}-{note}")
    info = mgr.epoch_end(1, {"w": np.ones(2)}, metrics={"val/loss": 0.25, "note": "x/y"})
    assert info is not None and info.name == "e1-0.25-x_y"
    entries = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert entries == ["e1-0.25-x_y"]
    assert (tmp_path / info.name / "manifest.msgpack").is_file()
    assert CheckpointManager(tmp_path, monitor="val/loss").best.name == info.name


def test_manager_refuses_bad_template_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        CheckpointManager(tmp_path, filename="sub/{epoch}")


def test_manager_missing_field_at_save(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, filename="e{epoch}-{val_acc:.2f}")
    with pytest.raises(ConfigurationError, match="val_acc"):
        mgr.epoch_end(1, {"w": np.ones(1)}, metrics={"loss": 1.0})
    assert mgr.checkpoints == []
