"""An error on one rank arrives on the others as the same class of the engine's error tree."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _ranks import ThreadCoordinator, run_ranks

from checkpointer import CheckpointManager, collective, commit, errors
from checkpointer.distributed import failure, raised_elsewhere, run_on_primary
from checkpointer.errors import (
    CheckpointError,
    ChecksumMismatchError,
    ConfigurationError,
    CorruptCheckpointError,
    StorageError,
)
from checkpointer.sharding import Shard, ShardedArray


class Got:
    """What one rank raised (wrapped: ``run_ranks`` re-raises a rank's result that is an error)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def _outcome(fn: Any) -> Got:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the test compares what each rank got
        return Got(exc)
    return Got(None)


def _on_two_ranks(body: Any) -> list[BaseException | None]:
    return [got.error for got in run_ranks(body, ranks=2)]


@pytest.mark.parametrize("raised, arrives", [
    (StorageError("disk full"), StorageError),
    (ConfigurationError("bad template"), ConfigurationError),
    (ChecksumMismatchError("w: crc"), ChecksumMismatchError),
    (ValueError("not ours"), CheckpointError),     # outside the tree: the root
    (OSError(28, "No space left"), CheckpointError),
])
def test_an_error_of_rank0_keeps_its_class_on_rank1(raised: Exception, arrives: type) -> None:
    def fn() -> int:
        raise raised

    def body(rank: int, coord: ThreadCoordinator) -> Got:
        return _outcome(lambda: run_on_primary(coord, fn, lambda v: v, lambda v: v))

    on0, on1 = _on_two_ranks(body)
    assert on0 is raised  # rank 0 raises its own error unchanged
    assert type(on1) is arrives
    assert str(on1) == f"rank 0 failed: {type(raised).__name__}: {raised}"


@pytest.mark.parametrize("name", errors.__all__)
def test_every_class_of_the_tree_is_found_by_name(name: str) -> None:
    cls = getattr(errors, name)
    got = raised_elsewhere(failure(cls("x")), "rank 3 failed")
    assert type(got) is cls and str(got) == f"rank 3 failed: {name}: x"


@pytest.mark.parametrize("message", [
    {"ok": False, "error": "e", "type": "Monitor"},          # a name of the package, not an error
    {"ok": False, "error": "e", "type": "__builtins__"},
    {"ok": False, "error": "e", "type": "SystemExit"},
    {"ok": False, "error": "e", "type": "os"},
    {"ok": False, "error": "e", "type": 42},
    {"ok": False, "error": "e"},                              # an older rank: no type sent
    "not a dict",
])
def test_an_unknown_class_arrives_as_checkpoint_error(message: Any) -> None:
    got = raised_elsewhere(message, "")
    assert type(got) is CheckpointError


def test_agree_gives_the_failed_ranks_class_to_the_others() -> None:
    mine = ChecksumMismatchError("tensor w: crc mismatch")

    def body(rank: int, coord: ThreadCoordinator) -> Got:
        return Got(collective.agree(coord, mine if rank == 1 else None))

    on0, on1 = _on_two_ranks(body)
    assert on1 is mine
    assert isinstance(on0, CorruptCheckpointError) and type(on0) is ChecksumMismatchError
    assert str(on0) == "rank 1: ChecksumMismatchError: tensor w: crc mismatch"


def _save_on_two_ranks(tmp_path: Any, **options: Any) -> list[BaseException | None]:
    def body(rank: int, coord: ThreadCoordinator) -> Got:
        mgr = CheckpointManager(tmp_path, coordinator=coord, **options)
        got = _outcome(lambda: mgr.save({"w": np.ones(3)}, step=1, metrics={"loss": 0.5}))
        assert mgr.checkpoints == []  # no rank lists a failed save
        mgr.close()
        return got
    return _on_two_ranks(body)


def test_a_storage_error_of_rank0s_commit_is_a_storage_error_on_rank1(tmp_path, monkeypatch):
    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(commit, "write_checkpoint", full)  # rank 0 alone writes the manifest

    on0, on1 = _save_on_two_ranks(tmp_path)
    assert type(on0) is StorageError and type(on1) is StorageError
    assert "No space left" in str(on1) and str(on1).startswith("rank 0 failed: StorageError")


def test_a_configuration_error_of_rank0s_decision_is_one_on_rank1(tmp_path):
    on0, on1 = _save_on_two_ranks(tmp_path, filename="{val_loss:.2f}")  # no val_loss given
    assert type(on0) is ConfigurationError and type(on1) is ConfigurationError
    assert "val_loss" in str(on1)


def test_a_storage_error_of_rank1s_part_is_a_storage_error_everywhere(tmp_path, monkeypatch):
    def full(*args: Any, **kwargs: Any) -> Any:
        raise StorageError("bucket full")
    monkeypatch.setattr(collective, "write_rank_files", full)  # the other ranks' data files

    def body(rank: int, coord: ThreadCoordinator) -> Got:
        mgr = CheckpointManager(tmp_path, coordinator=coord)
        piece = np.full((1, 2), rank, np.float32)
        state = {"x": ShardedArray((2, 2), np.dtype(np.float32), (Shard((rank, 0), piece),))}
        return _outcome(lambda: mgr.save(state, step=1))

    on0, on1 = _on_two_ranks(body)
    assert type(on0) is StorageError and type(on1) is StorageError
    assert str(on0) == "rank 1 failed to write its part: StorageError: bucket full"


def test_a_rank_interrupted_while_preparing_its_part_fails_the_save_everywhere(tmp_path):
    """The interrupted rank still takes part (no other rank hangs), then raises its
    interrupt; the others get a save error naming it; nothing is committed."""
    def body(rank: int, coord: ThreadCoordinator) -> Got:
        mgr = CheckpointManager(tmp_path, coordinator=coord)

        def state() -> dict[str, Any]:
            if rank == 1:
                raise KeyboardInterrupt
            return {"w": np.ones(3)}
        got = _outcome(lambda: mgr.save(state, step=1))
        assert mgr.checkpoints == []
        return got

    on0, on1 = _on_two_ranks(body)
    assert type(on1) is KeyboardInterrupt
    assert isinstance(on0, CheckpointError) and "KeyboardInterrupt" in str(on0)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
