"""The index is a cache for listing speed, never a reason to delete; two managers with
different retention settings on one directory never delete each other's checkpoints."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.frame import decode_framed, encode_framed
from checkpointer.index import INDEX_MAGIC, INDEX_NAME


def _forge(tmp_path: Path, name: str, **changes: Any) -> None:
    """Rewrite ``name``'s index row (its stamp kept: the row still looks current)."""
    path = tmp_path / INDEX_NAME
    doc = decode_framed(path.read_bytes(), INDEX_MAGIC, str(path))
    rows = {r[0]: r for r in doc["checkpoints"]}
    row = rows.get(name)
    if row is None:  # a row for a folder the index never listed
        row = [name, None, None, {}, 0.0, 0, 0, True, ""]
        doc["checkpoints"].append(row)
    for field, value in changes.items():
        row[["name", "step", "epoch", "metrics", "time", "nbytes", "seq", "managed", "stamp"].index(field)] = value
    path.write_bytes(encode_framed(INDEX_MAGIC, doc))


def _mgr(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path, monitor="val_loss", keep_best=1, keep_last=1)


def test_a_forged_better_best_in_the_index_does_not_delete_the_real_best(tmp_path: Path) -> None:
    mgr = _mgr(tmp_path)
    mgr.save({"v": 1}, epoch=1, metrics={"val_loss": 0.5})
    best = mgr.save({"v": 2}, epoch=2, metrics={"val_loss": 0.1}).name
    third = mgr.save({"v": 3}, epoch=3, metrics={"val_loss": 0.4}).name
    assert [c.name for c in mgr.checkpoints] == [best, third]
    _forge(tmp_path, third, metrics={"val_loss": 0.01})
    again = _mgr(tmp_path)
    assert again.best is not None and again.best.name == third  # listing trusts the cache
    fourth = again.save({"v": 4}, epoch=4, metrics={"val_loss": 0.3}).name
    assert [c.name for c in again.checkpoints] == [best, fourth]  # the manifest decided
    assert again.best is not None and again.best.name == best
    assert checkpointer.load(tmp_path / best) == {"v": 2}


def test_an_index_row_marking_a_one_off_save_as_managed_does_not_delete_it(tmp_path: Path) -> None:
    checkpointer.save(tmp_path / "manual", {"v": 0})
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save({"v": 1}, step=1)
    _forge(tmp_path, "manual", managed=True, seq=5)
    again = CheckpointManager(tmp_path, keep_last=1)
    again.save({"v": 2}, step=2)
    again.save({"v": 3}, step=3)
    assert checkpointer.load(tmp_path / "manual") == {"v": 0}
    assert "manual" in [c.name for c in again.checkpoints]


def test_a_stampless_row_for_another_tools_folder_does_not_delete_it(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save({"v": 1}, step=1)
    foreign = tmp_path / "other-tool"
    foreign.mkdir()
    (foreign / "manifest.msgpack").write_bytes(b"another tool's manifest")
    (foreign / "weights.bin").write_bytes(b"\0" * 64)
    _forge(tmp_path, "other-tool", managed=True, seq=0)
    again = CheckpointManager(tmp_path, keep_last=1)
    again.save({"v": 2}, step=2)
    again.save({"v": 3}, step=3)
    assert sorted(p.name for p in foreign.iterdir()) == ["manifest.msgpack", "weights.bin"]


def test_two_managers_with_different_settings_keep_each_others_checkpoints(tmp_path: Path) -> None:
    a = CheckpointManager(tmp_path, monitor="val_loss", keep_best=1, keep_last=1)
    for epoch, loss in enumerate([0.5, 0.1, 0.4], start=1):
        a.save({"a": epoch}, epoch=epoch, metrics={"val_loss": loss})
    a_names = [c.name for c in a.checkpoints]
    assert len(a_names) == 2
    b = CheckpointManager(tmp_path, keep_last=1, filename="b-{step}")
    b.save({"b": 1}, step=1)
    b.save({"b": 2}, step=2)
    assert [c.name for c in b.checkpoints] == [*a_names, "b-2"]  # b-1 went: B's own
    why = {info.name: reasons for info, _, reasons in b.explain_retention()}
    assert all("written with other retention settings" in why[n] for n in a_names)
    a2 = CheckpointManager(tmp_path, monitor="val_loss", keep_best=1, keep_last=1)
    assert a2.restore("best").state == {"a": 2}
    a2.save({"a": 4}, epoch=4, metrics={"val_loss": 0.3})
    assert "b-2" in [c.name for c in a2.checkpoints]  # and A never deletes B's
    assert [c.epoch for c in a2.checkpoints if c.name != "b-2"] == [2, 4]


def test_the_same_settings_resume_and_prune_as_one_run(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        first.save({"s": step}, step=step)
    second = CheckpointManager(tmp_path, keep_last=2)
    second.save({"s": 4}, step=4)
    assert [c.step for c in second.checkpoints] == [3, 4]


def test_manifests_without_recorded_settings_count_as_the_same(tmp_path: Path) -> None:
    """Checkpoints of the first release record no settings: a resumed run prunes them."""
    import shutil

    src = Path(__file__).parents[1] / "fixtures" / "v1"
    managed = next(p for p in sorted(src.iterdir()) if p.is_dir() and (p / INDEX_NAME).exists())
    shutil.copytree(managed, tmp_path / "run")
    before = [c.name for c in CheckpointManager(tmp_path / "run").checkpoints]
    mgr = CheckpointManager(tmp_path / "run", keep_last=1)
    mgr.save({"v": np.zeros(2)}, step=10**6)
    assert [c.name for c in mgr.checkpoints] == [mgr.checkpoints[-1].name]
    assert len(before) >= 1


def test_a_manifest_with_a_malformed_settings_field_is_never_deleted(tmp_path: Path) -> None:
    from checkpointer.manifest import MANIFEST_MAGIC

    mgr = CheckpointManager(tmp_path, keep_last=1)
    name = mgr.save({"v": 1}, step=1).name
    path = tmp_path / name / "manifest.msgpack"
    doc = decode_framed(path.read_bytes(), MANIFEST_MAGIC, str(path))
    doc["retention"] = ["not", "a", "map"]
    path.write_bytes(encode_framed(MANIFEST_MAGIC, doc))
    again = CheckpointManager(tmp_path, keep_last=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.save({"v": 2}, step=2)
        again.save({"v": 3}, step=3)
    assert name in [c.name for c in again.checkpoints]


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_explain_retention_names_every_reason(tmp_path: Path, backend: str) -> None:
    url = str(tmp_path) if backend == "local" else f"memory://explain-{tmp_path.name}"
    mgr = CheckpointManager(url, monitor="val_loss", keep_best=2, keep_last=1, keep_every_n_steps=100)
    for step, loss in [(100, 0.9), (150, 0.2), (200, 0.8), (250, 0.3), (260, 0.5), (270, 0.6)]:
        mgr.save({"s": step}, step=step, metrics={"val_loss": loss})
    rows = {info.step: (kept, reasons) for info, kept, reasons in mgr.explain_retention()}
    assert rows[100] == (True, ["step multiple of 100"])
    assert rows[150] == (True, ["best", "top 2 by val_loss"])
    assert rows[200] == (True, ["step multiple of 100"])
    assert rows[250] == (True, ["top 2 by val_loss"])
    assert rows[270] == (True, ["latest", "last 1"])
    assert 260 not in rows  # deleted when 270 came
    checkpointer.save(f"{url}/manual", {"x": 1})
    restored = CheckpointManager(url, monitor="val_loss", keep_best=2, keep_last=1, keep_every_n_steps=100)
    restored.restore(250)
    rows2 = {info.name: reasons for info, _, reasons in restored.explain_retention()}
    assert rows2["manual"] == ["not written by this engine"]
    assert "restored from" in next(r for i, _, r in restored.explain_retention() if i.step == 250)


@pytest.mark.parametrize("torn", [b"", b"CKPTIDX1\x00\x01", b"garbage" * 100])
def test_the_index_is_never_fsynced_and_a_torn_one_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               torn: bytes) -> None:
    """A save fsyncs its data file, its manifest and the two folders; the index, a cache,
    is written without an fsync. A crash may then leave it empty or torn: the next manager
    lists every checkpoint from the manifests and writes a whole index again."""
    import os

    from checkpointer import index as index_mod

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else "?")
        real_fsync(fd)

    with CheckpointManager(tmp_path, keep_last=3) as mgr:
        mgr.save({"w": np.ones(4)}, step=1)
        monkeypatch.setattr(os, "fsync", fsync)
        index_mod.write_index(getattr(mgr, "_store"), [s.entry for s in getattr(mgr, "_entries")])  # noqa: B009
        assert synced == []  # the index write alone: no fsync at all
        mgr.save({"w": np.ones(4)}, step=2)
        assert synced and not any(INDEX_NAME in p or ".ckpt-tmp-index" in p for p in synced)
    monkeypatch.undo()
    (tmp_path / INDEX_NAME).write_bytes(torn)  # what a crash may leave
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuild is logged, never a warning to the user
        with CheckpointManager(tmp_path, keep_last=3) as again:
            assert [c.step for c in again.checkpoints] == [1, 2]
    doc = decode_framed((tmp_path / INDEX_NAME).read_bytes(), INDEX_MAGIC, "index")
    assert [r[0] for r in doc["checkpoints"]] == ["step-000000001", "step-000000002"]
