"""``diff`` and ``export``: output, ``--json``, a missing path, a broken checkpoint and
``s3://`` on the moto server."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from _cli_lib import flip_byte
from safetensors.numpy import load_file

import checkpointer
from checkpointer.cli import main
from checkpointer.cli_diff import compare
from checkpointer.format import read_header
from checkpointer.reading import read_tensors
from checkpointer.sharding import Shard, ShardedArray


def base_state() -> dict:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "gone": np.zeros(3, np.int64),
            "b": np.ones(3, np.float32), "h": np.ones(4, np.float32), "t": 375, "name": "run"}


@pytest.fixture()
def pair(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    checkpointer.save(a, base_state(), metadata={"lr": 0.1})
    s = base_state()
    s["w"] = s["w"] + np.array([[0, 0, 0], [0, 0, 0.5]], np.float32)
    del s["gone"]
    s["new"] = np.zeros(2, np.float32)
    s["b"] = np.ones(4, np.float32)  # shape change
    s["h"] = np.ones(4, ml_dtypes.bfloat16)  # dtype change only
    s["t"] = 400
    checkpointer.save(b, s, metadata={"lr": 0.2})
    return a, b


def test_diff_equal_checkpoints_exit_0(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for url in (a, b):
        checkpointer.save(url, {**base_state(), "nan": np.array([np.nan, 1.0])})  # NaN == NaN
    assert main(["diff", a, b]) == 0
    assert "equal: 5 arrays" in capsys.readouterr().out
    assert main(["diff", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["equal"] is True


def test_diff_reports_every_kind_of_change_exit_1(pair, capsys):
    a, b = pair
    assert main(["diff", a, b]) == 1
    lines = capsys.readouterr().out.splitlines()
    found = {tuple(line.split()[:3]): line for line in lines}
    w = found["array", "changed", "w"]
    assert "1 of 6 elements differ" in w and "max abs 0.5" in w and "max rel 0.1" in w
    assert "shape 3 -> 4" in found["array", "changed", "b"]
    assert "dtype float32 -> bfloat16" in found["array", "changed", "h"]
    assert ("array", "removed", "gone") in found and ("array", "added", "new") in found
    assert "375 -> 400" in found["value", "changed", "state/t"]
    assert "0.1 -> 0.2" in found["value", "changed", "metadata/lr"]
    assert lines[-1].startswith("different: 3 arrays changed, 1 added, 1 removed; 2 values changed")


def test_diff_json_and_atol(pair, capsys):
    a, b = pair
    assert main(["diff", a, b, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    changed = {c["key"]: c for c in doc["arrays"]["changed"]}
    assert changed["w"]["differing"] == 1 and changed["w"]["max_abs"] == 0.5
    assert changed["w"]["max_rel"] == pytest.approx(0.1)
    assert changed["b"]["shape"] == [[3], [4]] and changed["b"]["max_abs"] is None
    assert changed["h"]["dtype"] == ["float32", "bfloat16"] and changed["h"]["differing"] == 0
    assert [x["key"] for x in doc["arrays"]["added"]] == ["new"]
    assert {"path": "state/t", "a": 375, "b": 400} in doc["values"]["changed"]
    assert main(["diff", a, b, "--atol", "0.6", "--json"]) == 1  # other changes remain
    changed = {c["key"]: c for c in json.loads(capsys.readouterr().out)["arrays"]["changed"]}
    assert "w" not in changed and "b" in changed


def test_diff_compares_sharded_arrays_as_logical_tensors(tmp_path, capsys):
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    checkpointer.save(a, {"x": full})
    checkpointer.save(b, {"x": ShardedArray((4, 3), np.float32, (Shard((0, 0), full[:1]),
                                                                   Shard((1, 0), full[1:])))})
    assert main(["diff", a, b]) == 0, capsys.readouterr().out


def test_compare_ints_exactly_and_nan_against_a_number():
    big = np.array([2**60, 5], np.int64)
    assert compare(big, big + np.array([1, 0]))[0] == 1  # lost in float64, found exactly
    n, max_abs, _ = compare(np.array([np.nan, 1.0]), np.array([0.0, 1.0]))
    assert n == 1 and np.isnan(max_abs)
    assert compare(np.array([0.0]), np.array([1.0]))[2] == np.inf


def test_diff_missing_and_broken(pair, tmp_path, capsys):
    a, b = pair
    assert main(["diff", a, str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    flip_byte(os.path.join(b, "data-00000.safetensors"))
    assert main(["diff", a, b]) == 2
    err = capsys.readouterr().err
    assert "checksum" in err and "Traceback" not in err


def test_diff_on_s3(s3, tmp_path, capsys):
    url = s3.fresh()
    checkpointer.save(f"{url}/a", base_state(), storage_options=s3.options)
    checkpointer.save(str(tmp_path / "a"), base_state())
    assert main(["diff", f"{url}/a", str(tmp_path / "a"), *s3.args]) == 0
    assert main(["diff", f"{url}/a", f"{url}/missing", *s3.args]) == 2


def _escaped_and_sharded(tmp_path) -> tuple[str, np.ndarray]:
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    url = str(tmp_path / "ck")
    checkpointer.save(url, {
        "model": {"layer.weight": full, "seq/dense": np.ones(2, np.float16),
                  "emb": ShardedArray((4, 3), np.float32, (Shard((0, 0), full[:2]), Shard((2, 0), full[2:])))},
        "opt": {"m": np.zeros(3, np.float64)}, "h": np.ones(2, ml_dtypes.bfloat16), "epoch": 3})
    return url, full


def test_export_writes_standard_safetensors_with_unescaped_keys(tmp_path, capsys):
    url, full = _escaped_and_sharded(tmp_path)
    out = str(tmp_path / "all.safetensors")
    assert main(["export", url, out]) == 0
    assert "exported 5 arrays" in capsys.readouterr().out
    with open(out, "rb") as f:
        entries, _ = read_header(f, os.path.getsize(out), out)
        got, _ = read_tensors(f, entries, None, out)
    assert set(got) == {"model/layer.weight", "model/seq/dense", "model/emb", "opt/m", "h"}
    assert got["h"].dtype == ml_dtypes.bfloat16 and (got["model/emb"] == full).all()


def test_export_prefix_strips_it_and_the_file_loads_with_safetensors(tmp_path, capsys):
    url, full = _escaped_and_sharded(tmp_path)
    out = str(tmp_path / "model.safetensors")
    assert main(["export", url, out, "--prefix", "model"]) == 0
    got = load_file(out)
    assert set(got) == {"layer.weight", "seq/dense", "emb"}
    assert (got["layer.weight"] == full).all() and (got["emb"] == full).all()
    assert got["seq/dense"].dtype == np.float16


@pytest.mark.parametrize("state, prefix, message", [
    ({"a": np.ones(1)}, "nothing", "no arrays under --prefix 'nothing'; the top-level names are: a"),
    ({"a": np.ones(1)}, "a", "is an array itself"),
    ({"a/b": np.ones(1), "a": {"b": np.ones(1)}}, None, "would both be named 'a/b'"),
])
def test_export_refuses_what_a_flat_file_cannot_hold(tmp_path, capsys, state, prefix, message):
    url, out = str(tmp_path / "ck"), str(tmp_path / "o.safetensors")
    checkpointer.save(url, state)
    assert main(["export", url, out, *(["--prefix", prefix] if prefix else [])]) == 2
    assert message in capsys.readouterr().err and not os.path.exists(out)


def test_export_missing_and_broken_leave_no_file(tmp_path, capsys):
    url, _ = _escaped_and_sharded(tmp_path)
    out = tmp_path / "x.safetensors"
    assert main(["export", str(tmp_path / "nothing"), str(out)]) == 2
    flip_byte(os.path.join(url, "data-00000.safetensors"))
    assert main(["export", url, str(out)]) == 2
    assert "checksum" in capsys.readouterr().err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_export_on_s3(s3, tmp_path, capsys):
    url = s3.fresh()
    checkpointer.save(f"{url}/ck", {"w": np.arange(3, dtype=np.float32)}, storage_options=s3.options)
    local = str(tmp_path / "w.safetensors")
    assert main(["export", f"{url}/ck", local, *s3.args]) == 0
    assert (load_file(local)["w"] == np.arange(3)).all()
    assert main(["export", f"{url}/ck", f"{url}/w.safetensors", *s3.args]) == 0
    import fsspec

    remote = fsspec.open(f"{url}/w.safetensors", "rb", **s3.options).open().read()
    assert remote == open(local, "rb").read()
    assert main(["export", f"{url}/missing", local, *s3.args]) == 2
