"""The writer refuses what a reader would refuse, before writing (issue: save() committed
checkpoints that load() refused, then retention deleted the good one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager, commit
from checkpointer.errors import MetricError, StateTreeError
from checkpointer.manifest import MAX_MANIFEST_BYTES


def _only_good(tmp_path: Path, mgr: CheckpointManager, good: str) -> None:
    """The refused save left nothing: the good checkpoint is listed, loads, and no
    temporary folder remains."""
    assert [c.name for c in mgr.checkpoints] == [good]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ckpt-index")) == [good]
    np.testing.assert_array_equal(mgr.restore().state["w"], np.arange(4))
    again = CheckpointManager(tmp_path, keep_last=1)
    assert [c.name for c in again.checkpoints] == [good]


@pytest.mark.parametrize("case", ["str", "bytes"])
def test_str_and_bytes_leaves_over_the_manifest_cap_are_refused(tmp_path: Path, case: str) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save({"w": np.arange(4)}, step=1).name
    big = "x" * (MAX_MANIFEST_BYTES // 2 + 1)
    leaf = big if case == "str" else big.encode()
    with pytest.raises(StateTreeError, match=r"readers' cap.*largest str/bytes leaf is state\['notes'\]\[") as info:
        mgr.save({"w": np.arange(4), "notes": ["small", leaf, leaf]}, step=2)
    assert str(MAX_MANIFEST_BYTES) in str(info.value)
    _only_good(tmp_path, mgr, good)


def test_many_long_keys_over_the_manifest_cap_are_refused(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save({"w": np.arange(4)}, step=1).name
    empty = np.zeros(0, np.uint8)
    state = {"w": np.arange(4), **{f"{i:06d}" + "k" * 2000: empty for i in range(130_000)}}
    with pytest.raises(StateTreeError, match=r"130001 arrays.*readers' cap|readers' cap.*130001 arrays"):
        mgr.save(state, step=2)
    _only_good(tmp_path, mgr, good)


@pytest.mark.parametrize(("shape", "dtype"), [((0, 2**60), np.float32), ((0, 2**59, 2), np.float32),
                                              ((0, 2**62), np.uint8)])
def test_zero_size_arrays_with_impossible_extents_are_refused(tmp_path: Path, shape: tuple[int, ...],
                                                             dtype: type) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = mgr.save({"w": np.arange(4)}, step=1).name
    arr = np.empty(shape, dtype)
    with pytest.raises(StateTreeError, match=r"'huge'.*2\*\*62"):
        mgr.save({"w": np.arange(4), "huge": arr}, step=2)
    _only_good(tmp_path, mgr, good)


def test_zero_size_arrays_below_the_limit_round_trip(tmp_path: Path) -> None:
    state = {"a": np.empty((0, 2**40), np.float32), "b": np.empty((3, 0, 7), np.int8)}
    checkpointer.save(tmp_path / "c", state)
    back = checkpointer.load(tmp_path / "c")
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype


def test_a_key_too_long_for_any_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateTreeError, match="too long for a safetensors header"):
        checkpointer.save(tmp_path / "c", {"k" * (100 * 2**20): np.zeros(1)})
    assert not any(tmp_path.iterdir())


def test_files_are_cut_before_their_header_nears_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commit, "HEADER_BUDGET", 4096)
    state = {f"layer{i:03d}/" + "w" * 100: np.full(3, i, np.int32) for i in range(200)}
    checkpointer.save(tmp_path / "c", state)
    files = sorted(p.name for p in (tmp_path / "c").iterdir() if p.suffix == ".safetensors")
    assert len(files) > 5  # 200 entries of ~200 header bytes, 4 KiB of header per file
    for f in files:
        with open(tmp_path / "c" / f, "rb") as fh:
            assert int.from_bytes(fh.read(8), "little") <= 4096 + 400
    back = checkpointer.load(tmp_path / "c")
    assert all(np.array_equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**400, 10**5000], ids=["2^64", "-2^63-1", "1e400", "1e5000"])
def test_out_of_range_integer_metrics_are_metric_errors(tmp_path: Path, value: int) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(MetricError, match="'n'.*bits"):
        mgr.save({"w": np.zeros(1)}, metrics={"n": value})
    monitored = CheckpointManager(tmp_path, monitor="n", mode="max")
    with pytest.raises(MetricError, match="'n'.*bits"):
        monitored.save({"w": np.zeros(1)}, metrics={"n": value})
    assert mgr.checkpoints == [] and monitored.checkpoints == []


def test_integer_metrics_at_the_edges_round_trip(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, monitor="n", mode="max")
    mgr.save({"w": np.zeros(1)}, metrics={"n": 2**64 - 1, "m": -(2**63)})
    again = CheckpointManager(tmp_path, monitor="n", mode="max")
    assert again.latest is not None and again.latest.metrics == {"n": 2**64 - 1, "m": -(2**63)}
    assert again.best == again.latest


def test_a_manifest_readers_would_refuse_as_a_memory_flood_is_refused(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from checkpointer import frame

    monkeypatch.setattr(frame, "MEMORY_FLOOR", 0)  # the flood at a test's size
    with pytest.raises(StateTreeError, match="per byte"):
        checkpointer.save(tmp_path / "flood", {"w": np.zeros(2), "l": [[] for _ in range(20_000)]})
    assert not (tmp_path / "flood").exists()
    state = {"w": np.arange(10), "cfg": {"lr": 0.1, "name": "run", "layers": [64, 64]}}
    checkpointer.save(tmp_path / "ok", state)
    back = checkpointer.load(tmp_path / "ok")
    assert np.array_equal(back["w"], state["w"]) and back["cfg"] == state["cfg"]


def test_a_memory_shortage_on_restore_is_raised_not_fallen_back_from(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from checkpointer import restoring
    from checkpointer.errors import InsufficientMemoryError

    mgr = CheckpointManager(tmp_path)
    mgr.save({"w": np.zeros(2)}, step=1)
    mgr.save({"w": np.ones(2)}, step=2)
    real = restoring.load_checkpoint

    def short(store: object, name: str, **kw: object) -> object:
        if name.endswith("2"):
            raise InsufficientMemoryError(f"{name}: not enough memory to read tensor 'w'")
        return real(store, name, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(restoring, "load_checkpoint", short)
    with pytest.raises(MemoryError, match="not enough memory"):
        mgr.restore()
