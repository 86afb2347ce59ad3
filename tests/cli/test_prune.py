"""``prune``: what is kept and why, ``--dry-run``, only the engine's own checkpoints deleted,
never on the index's word; ``--json``, a missing path, a broken checkpoint, ``s3://``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _cli_lib import flip_byte

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.cli import main

LOSSES = [0.5, 0.3, 0.6, 0.7, 0.8, 0.9]  # the best is step 20


def write(url: str, storage_options=None) -> list[str]:
    """Six manager checkpoints (nothing deleted: no retention) and a one-off save."""
    with CheckpointManager(url, monitor="val_loss", storage_options=storage_options) as mgr:
        for i, loss in enumerate(LOSSES, start=1):
            mgr.save({"w": np.full(256, i, np.float32)}, step=i * 10, epoch=i, metrics={"val_loss": loss})
        names = [c.name for c in mgr.checkpoints]
    checkpointer.save(f"{url}/exported", {"w": np.zeros(2)}, storage_options=storage_options)
    return names


def table(out: str) -> dict[str, str]:
    """The rows of prune's table by name."""
    assert out.splitlines()[0].split() == ["NAME", "STEP", "EPOCH", "ACTION", "WHY"]
    return {line.split()[0]: line for line in out.splitlines() if line.startswith(("step-", "exported"))}


@pytest.fixture()
def run(tmp_path):
    url = str(tmp_path / "run")
    return url, write(url)


def test_dry_run_says_what_goes_and_why_and_deletes_nothing(run, capsys):
    url, names = run
    before = sorted(os.listdir(url))
    assert main(["prune", url, "--keep-last", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert sorted(os.listdir(url)) == before
    assert "latest" in rows[names[-1]] and "last 2" in rows[names[-1]] and "keep" in rows[names[-1]]
    assert "best" in rows[names[1]] and "keep" in rows[names[1]]
    assert "not written by this engine" in rows["exported"]
    for n in (names[0], names[2], names[3]):
        assert "would delete" in rows[n]
    assert "dry run: would delete 3 checkpoints" in out and "nothing was deleted" in out


def test_prune_deletes_only_what_the_policy_drops(run, capsys):
    url, names = run
    open(os.path.join(url, names[0], "notes.txt"), "w").write("mine")
    assert main(["prune", url, "--keep-last", "1", "--keep-best", "1"]) == 0
    out = capsys.readouterr().out
    assert "top 1 by val_loss" in table(out)[names[1]]
    mgr = CheckpointManager(url)
    assert [c.name for c in mgr.checkpoints] == ["exported", names[1], names[-1]]
    assert os.listdir(os.path.join(url, names[0])) == ["notes.txt"]  # the user's file stays
    assert f"{names[0]}: left the files the engine did not write: notes.txt" in out
    assert "deleted 4 checkpoints" in out


def test_prune_milestones_and_json(run, capsys):
    url, names = run
    assert main(["prune", url, "--keep-last", "1", "--keep-every-n-steps", "30", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ck = {c["name"]: c for c in doc["checkpoints"]}
    assert ck[names[2]]["reasons"] == ["step multiple of 30"] and not ck[names[2]]["deleted"]
    assert ck[names[0]]["deleted"] and ck[names[0]]["reasons"] == []
    assert doc["deleted"] == 3 and doc["monitor"] == "val_loss" and doc["freed_bytes"] > 3 * 1024
    assert sorted(p for p in os.listdir(url) if not p.startswith(".")) == [
        "exported", names[1], names[2], names[5]]


def test_a_broken_checkpoint_is_never_deleted(run, capsys):
    url, names = run
    flip_byte(os.path.join(url, names[0], "manifest.msgpack"))  # the index still lists it
    assert main(["prune", url, "--keep-last", "1"]) == 1
    out = capsys.readouterr().out
    assert "broken, left for you to look at" in table(out)[names[0]]
    assert os.path.exists(os.path.join(url, names[0], "manifest.msgpack"))
    assert not os.path.exists(os.path.join(url, names[2]))


@pytest.mark.parametrize("argv, message", [
    ([], "needs --keep-last"),
    (["--keep-last", "-1"], "keep_last must be an int >= 0"),
    (["--keep-best", "1", "--mode", "sideways"], "invalid choice"),
])
def test_prune_refuses_mistakes(run, capsys, argv, message):
    url, _ = run
    before = sorted(os.listdir(url))
    assert main(["prune", url, *argv]) == 2
    assert message in capsys.readouterr().err and sorted(os.listdir(url)) == before


def test_prune_a_missing_directory(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nowhere"), "--keep-last", "1"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_keep_best_without_a_monitor(tmp_path, capsys):
    url = str(tmp_path / "r")
    checkpointer.save(f"{url}/a", {"w": np.zeros(1)})
    assert main(["prune", url, "--keep-best", "1"]) == 2
    assert "--keep-best needs --monitor" in capsys.readouterr().err


def test_prune_on_s3(s3, capsys):
    url = s3.fresh()
    names = write(url, s3.options)
    assert main(["prune", url, "--keep-last", "2", *s3.args]) == 0
    left = sorted(c.name for c in CheckpointManager(url, storage_options=s3.options).checkpoints)
    assert left == sorted(["exported", names[1], names[4], names[5]])
