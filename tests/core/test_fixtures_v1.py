"""Checkpoints written by the first release (tests/fixtures/v1) keep loading, bit-exact."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.api import read_metadata
from checkpointer.cli import main
from checkpointer.sharding import ShardSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures"))
import v1_states  # noqa: E402

FIXTURES = v1_states.HERE


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A writable copy (a manager may rewrite the index; the fixtures stay as committed)."""
    return Path(shutil.copytree(FIXTURES, tmp_path / "v1"))


def test_plain_checkpoint_loads_bit_exact(same_tree: Callable[[Any, Any], None]) -> None:
    same_tree(checkpointer.load(FIXTURES / "plain"), v1_states.plain_state())
    assert read_metadata(FIXTURES / "plain") == {"note": "v1 fixture"}


def test_lazy_reads_of_an_old_checkpoint() -> None:
    want = v1_states.plain_state()["model"]
    with checkpointer.open(FIXTURES / "plain") as ckpt:
        assert np.array_equal(ckpt.tensor("model/w"), want["w"])
        assert ckpt.state(lazy=True)["model"]["bf16"].load().tobytes() == want["bf16"].tobytes()


def test_manager_resumes_from_an_old_directory_and_index(v1: Path) -> None:
    mgr = CheckpointManager(v1 / "managed", monitor="val_loss", keep_last=2)
    assert [c.name for c in mgr.checkpoints] == ["step-000000020", "step-000000030"]
    assert mgr.best is not None and mgr.best.metrics == {"val_loss": 0.25}
    assert np.array_equal(mgr.restore("best").state["w"], np.full(3, 2, np.float32))
    info = mgr.epoch_end(4, {"w": np.zeros(3, np.float32)}, step=40, metrics={"val_loss": 0.1})
    assert info is not None and mgr.latest == info
    assert [c.name for c in CheckpointManager(v1 / "managed").checkpoints][-1] == "step-000000040"


def test_sharded_checkpoint_whole_and_resharded(same_tree: Callable[[Any, Any], None], v1: Path) -> None:
    url = FIXTURES / "sharded" / "step-000000001"
    same_tree(checkpointer.load(url), v1_states.sharded_whole())
    full = v1_states.sharded_whole()["emb"]
    spec = ShardSpec(full.shape, full.dtype, (((1000, 0), (100, 1024)),))
    # a manager on a copy: it may rewrite the index (the fixtures' files change mtime on a clone)
    got = CheckpointManager(v1 / "sharded").restore(1, template={"emb": spec}).state["emb"]
    assert np.array_equal(got.shards[0].data, full[1000:1100])


def test_object_store_layout_loads() -> None:
    state = checkpointer.load(FIXTURES / "objects" / "step-000000005")
    assert np.array_equal(state["w"], np.arange(6, dtype=np.int32))


def test_verify_accepts_every_old_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    for directory in ("managed", "sharded", "objects"):
        assert main(["verify", str(FIXTURES / directory)]) == 0
    assert main(["verify", str(FIXTURES / "plain")]) == 0
    assert "FAILED" not in capsys.readouterr().out
