"""``ls``, ``inspect`` and ``verify``: output, ``--json``, a missing path, a broken
checkpoint and ``s3://`` on the moto server."""

from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest
from _cli_lib import flip_byte

import checkpointer
from checkpointer.cli import main
from checkpointer.sharding import Shard, ShardedArray

NAMES = ["step-000000020", "step-000000040"]


def rows(out: str) -> dict[str, str]:
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "EPOCH", "METRICS", "SIZE", "SAVED", "MARKS"]
    return {line.split()[0]: line for line in lines[1:] if not line.startswith("broken:")}


def test_ls_table_marks_latest_and_best_with_human_size_and_time(run_dir, capsys):
    assert main(["ls", run_dir]) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == set(NAMES)
    assert table[NAMES[1]].endswith("latest,best")
    assert "val_loss=0.5" in table[NAMES[0]] and re.search(r"  \d+ B  ", table[NAMES[0]])
    assert time.strftime("%Y-%m-%d") in table[NAMES[0]]  # a local date, not a raw float


def test_ls_json(run_dir, capsys):
    assert main(["ls", run_dir, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["monitor"] == "val_loss"
    ck = {c["name"]: c for c in doc["checkpoints"]}
    assert list(ck) == NAMES
    assert ck[NAMES[1]]["latest"] and ck[NAMES[1]]["best"] and not ck[NAMES[0]]["latest"]
    assert ck[NAMES[0]]["step"] == 20 and ck[NAMES[0]]["metrics"] == {"val_loss": 0.5}
    assert ck[NAMES[0]]["broken"] is None and ck[NAMES[0]]["nbytes"] > 24
    assert isinstance(ck[NAMES[0]]["time"], float) and ck[NAMES[0]]["managed"] is True


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_a_missing_directory_is_an_error(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and "nowhere" in err and "Traceback" not in err


def test_an_empty_directory_lists_nothing(tmp_path, capsys):
    assert main(["ls", str(tmp_path)]) == 0
    assert "no checkpoints in" in capsys.readouterr().out
    assert main(["ls", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"] == []


def test_ls_marks_a_broken_manifest_broken_never_latest(run_dir, capsys):
    flip_byte(os.path.join(run_dir, NAMES[1], "manifest.msgpack"))  # the newest, and the best
    assert main(["ls", run_dir]) == 1
    out = capsys.readouterr().out
    table = rows(out)
    assert table[NAMES[1]].rstrip().endswith("broken") and "latest" not in table[NAMES[1]]
    assert table[NAMES[0]].endswith("latest,best")
    assert f"broken: {NAMES[1]}:" in out and "checksum" in out
    assert "step=40" not in out and "40" in table[NAMES[1]]  # the index's row gives context
    assert main(["ls", run_dir, "--json"]) == 1
    ck = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert "checksum" in ck[NAMES[1]]["broken"] and not ck[NAMES[1]]["latest"]
    assert ck[NAMES[0]]["latest"]


def test_ls_marks_a_missing_data_file_broken(run_dir, capsys):
    os.remove(os.path.join(run_dir, NAMES[1], "data-00000.safetensors"))
    assert main(["ls", run_dir]) == 1
    out = capsys.readouterr().out
    assert "data-00000.safetensors" in out and rows(out)[NAMES[0]].endswith("latest,best")


def test_ls_of_a_checkpoint_points_at_inspect(run_dir, capsys):
    assert main(["ls", os.path.join(run_dir, NAMES[0])]) == 2
    assert "checkpointer inspect" in capsys.readouterr().err


def test_ls_on_s3(s3, s3_run, capsys):
    assert main(["ls", s3_run, *s3.args]) == 0
    assert rows(capsys.readouterr().out)[NAMES[1]].endswith("latest,best")
    assert main(["ls", s3_run, "--json", *s3.args]) == 0
    assert [c["name"] for c in json.loads(capsys.readouterr().out)["checkpoints"]] == NAMES
    assert main(["ls", "s3://no-such-bucket/run", *s3.args]) == 2
    assert "no such directory" in capsys.readouterr().err


def _sharded_and_escaped(tmp_path) -> str:
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    sharded = ShardedArray((8, 3), np.float32, (Shard((0, 0), full[:4]), Shard((4, 0), full[4:])))
    url = str(tmp_path / "one")
    checkpointer.save(url, {"weights": {"sequential/dense/kernel": np.ones((2, 2), np.float32)},
                            "emb": sharded, "lr": 0.5, "name": "run7"}, metadata={"git": "abc"})
    return url


def test_inspect_shows_unescaped_keys_logical_arrays_human_units(tmp_path, capsys):
    url = _sharded_and_escaped(tmp_path)
    assert main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert "weights/sequential/dense/kernel" in out and "~1" not in out
    emb = next(line for line in out.splitlines() if line.startswith("emb "))
    assert "float32" in emb and "8x3" in emb and "96 B" in emb and "2 pieces" in emb
    assert "@" not in out  # no stored piece keys
    assert time.strftime("%Y-%m-%d") in out and "lr = 0.5" in out and "'run7'" in out
    assert "{'git': 'abc'}" in out


def test_inspect_json(tmp_path, capsys):
    url = _sharded_and_escaped(tmp_path)
    assert main(["inspect", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    arrays = {a["key"]: a for a in doc["arrays"]}
    assert arrays["emb"]["shape"] == [8, 3] and arrays["emb"]["pieces"] == 2
    assert arrays["weights/sequential/dense/kernel"]["dtype"] == "float32"
    assert doc["values"] == {"lr": 0.5, "name": "run7"} and doc["metadata"] == {"git": "abc"}
    assert doc["managed"] is False and isinstance(doc["time"], float)


def test_inspect_missing_broken_and_directory(run_dir, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", run_dir]) == 2
    err = capsys.readouterr().err
    assert "directory of checkpoints" in err and NAMES[0] in err
    flip_byte(os.path.join(run_dir, NAMES[0], "manifest.msgpack"))
    assert main(["inspect", os.path.join(run_dir, NAMES[0])]) == 2
    err = capsys.readouterr().err
    assert "manifest.msgpack" in err and "checksum" in err and "Traceback" not in err


def test_inspect_on_s3(s3, s3_run, capsys):
    assert main(["inspect", f"{s3_run}/{NAMES[1]}", *s3.args]) == 0
    out = capsys.readouterr().out
    assert "2x3" in out and "step = 40" in out and "val_loss=0.4" in out
    assert main(["inspect", f"{s3_run}/nothing", *s3.args]) == 2


def test_verify_ok_json_and_a_flipped_data_byte(run_dir, capsys):
    assert main(["verify", run_dir]) == 0
    assert "2 verified, 0 failed" in capsys.readouterr().out
    flip_byte(os.path.join(run_dir, NAMES[1], "data-00000.safetensors"))
    assert main(["verify", run_dir]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and NAMES[1] in out and "1 verified, 1 failed" in out
    assert main(["verify", os.path.join(run_dir, NAMES[1]), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] == 1 and "checksum" in doc["checkpoints"][0]["error"]
    assert main(["verify", os.path.join(run_dir, NAMES[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][0]["ok"] is True


def test_verify_empty_directory_fails(tmp_path):
    assert main(["verify", str(tmp_path)]) == 1


def test_verify_on_s3(s3, s3_run, capsys):
    assert main(["verify", s3_run, *s3.args]) == 0
    assert "2 verified, 0 failed" in capsys.readouterr().out
    assert main(["verify", f"{s3_run}/{NAMES[0]}", *s3.args]) == 0
