"""Hostile or odd values in fields that pass the checksum: a clear error or a graceful
fallback, never a raw ``OverflowError`` / ``ValueError`` / ``AttributeError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager, errors
from checkpointer.cli import main
from checkpointer.frame import decode_framed, encode_framed
from checkpointer.index import INDEX_NAME
from checkpointer.manifest import MANIFEST_MAGIC, MANIFEST_NAME
from checkpointer.naming import template_fields


def _edit_manifest(ckpt: Path, **fields: Any) -> None:
    body = decode_framed((ckpt / MANIFEST_NAME).read_bytes(), MANIFEST_MAGIC, "t")
    body.update(fields)
    (ckpt / MANIFEST_NAME).write_bytes(encode_framed(MANIFEST_MAGIC, body))


def test_a_forged_huge_seq_does_not_break_later_saves(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        first = mgr.save({"w": np.zeros(2)}, step=1)
    _edit_manifest(tmp_path / first.name, seq=2**64 - 1)
    (tmp_path / INDEX_NAME).unlink()
    with CheckpointManager(tmp_path) as mgr:
        info = mgr.save({"w": np.ones(2)}, step=2)
        assert mgr.latest == info and len(mgr.checkpoints) == 2


def test_an_int_leaf_beyond_the_digit_limit_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(errors.StateTreeError, match=r"\['opt'\]\['n'\].*4,300 digits"):
        checkpointer.save(tmp_path / "c", {"opt": {"n": 10**5000}})
    checkpointer.save(tmp_path / "c", {"n": 10**4000})  # within the limit: stored exactly
    assert checkpointer.load(tmp_path / "c")["n"] == 10**4000


def test_inspect_and_ls_survive_odd_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointManager(tmp_path) as mgr:  # no monitor: a str metric is just recorded
        a = mgr.save({"w": np.zeros(2)}, step=1, metrics={"val_loss": 0.5})
        mgr.save({"w": np.zeros(2)}, step=2, metrics={"val_loss": "n/a"})
    _edit_manifest(tmp_path / a.name, metrics=[1, 2])
    assert main(["inspect", str(tmp_path / a.name)]) == 0
    assert "[1, 2]" in capsys.readouterr().out
    assert main(["ls", str(tmp_path), "--monitor", "val_loss"]) == 0
    assert "step-000000002" in capsys.readouterr().out


def test_ls_with_an_unusable_monitor_in_the_index_still_lists(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointManager(tmp_path, monitor="val_loss") as mgr:
        mgr.save({"w": np.zeros(2)}, step=1, metrics={"val_loss": 0.5})
    index = decode_framed((tmp_path / INDEX_NAME).read_bytes(), b"CKPTIDX1", "i")
    index["config"] = {"monitor": "val_loss", "mode": "sideways"}
    (tmp_path / INDEX_NAME).write_bytes(encode_framed(b"CKPTIDX1", index))
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "step-000000001" in out.out and "latest" in out.out and "unusable" in out.err


def test_a_folder_where_the_index_belongs_does_not_block_replacing_saves(tmp_path: Path) -> None:
    (tmp_path / INDEX_NAME).mkdir(parents=True)
    with CheckpointManager(tmp_path, filename="slot") as mgr:
        mgr.save({"w": np.zeros(2)}, step=1)
        mgr.save({"w": np.ones(2)}, step=2)  # replaces "slot"
        assert np.array_equal(mgr.restore("latest").state["w"], np.ones(2))


@pytest.mark.parametrize("template", ["{step.__class__}", "{epoch[0]}", "x{step.real:03d}"])
def test_templates_refuse_attribute_and_index_access(template: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="attribute or index"):
        template_fields(template)
    with pytest.raises(errors.ConfigurationError):
        CheckpointManager("memory://naming-refusal", filename=template)
