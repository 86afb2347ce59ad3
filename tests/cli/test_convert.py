"""``convert``: .safetensors, .npz and PyTorch/Lightning files in, never through plain
unpickling; what was dropped is named; a missing source, a broken one, ``s3://``."""

from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import checkpointer
from checkpointer.api import read_metadata
from checkpointer.cli import main


class Boom:
    """Unpickling it creates ``path``: proof that a loader ran code from the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_convert_safetensors(tmp_path, capsys):
    src, dst = str(tmp_path / "m.safetensors"), str(tmp_path / "ck" / "imported")
    arrays = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(7)}
    save_file(arrays, src, metadata={"format": "np"})
    assert main(["convert", src, dst]) == 0
    out = capsys.readouterr().out
    assert "2 arrays" in out and "dropped" not in out
    state = checkpointer.load(dst)
    assert set(state) == set(arrays) and all((state[k] == v).all() for k, v in arrays.items())
    meta = read_metadata(dst)
    assert meta["format"] == "safetensors" and meta["converted_from"] == src
    assert meta["safetensors_metadata"] == {"format": "np"} and meta["dropped"] == []
    assert main(["verify", dst]) == 0


def test_convert_npz_never_unpickles_and_names_what_it_dropped(tmp_path, capsys):
    marker = tmp_path / "ran"
    src, dst = str(tmp_path / "a.npz"), str(tmp_path / "ck")
    np.savez(src, w=np.ones(3, np.float32), evil=np.array([Boom(str(marker))], dtype=object))
    assert main(["convert", src, dst]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 value" in out and "evil" in out and not marker.exists()
    assert list(checkpointer.load(dst)) == ["w"]
    assert "evil" in read_metadata(dst)["dropped"][0]


def _torch_file(tmp_path, name: str):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))
    model[1].weight = torch.nn.Parameter(model[0].weight.t().contiguous())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    ckpt = {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 3,
            "global_step": 30, "half": torch.ones(2, dtype=torch.bfloat16),
            "hyper_parameters": {"lr": 0.01, "dtype": torch.float32}}
    path = str(tmp_path / name)
    torch.save(ckpt, path)
    return torch, model, opt, path


def test_convert_a_lightning_checkpoint_round_trips_into_torch(tmp_path, capsys):
    torch, model, opt, src = _torch_file(tmp_path, "last.ckpt")
    dst = str(tmp_path / "ck")
    assert main(["convert", src, dst]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 value" in out and "['hyper_parameters']['dtype']: torch.dtype" in out
    state = checkpointer.load(dst)
    assert state["epoch"] == 3 and state["hyper_parameters"] == {"lr": 0.01}
    assert str(state["half"].dtype) == "bfloat16"
    from checkpointer.adapters.torch import load_state

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    load_state({"model": fresh, "opt": fresh_opt},
               {"model": state["state_dict"], "opt": state["optimizer_states"][0]})
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sorted(fresh_opt.state_dict()["state"]) == sorted(opt.state_dict()["state"])  # int keys


def test_convert_refuses_a_torch_file_weights_only_refuses(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    src = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "x": Boom(str(marker))}, src)
    assert main(["convert", src, str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "never used" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "ck").exists()


def test_convert_missing_broken_unknown_and_occupied(tmp_path, run_dir, capsys):
    assert main(["convert", str(tmp_path / "none.safetensors"), str(tmp_path / "c")]) == 2
    assert "no such file" in capsys.readouterr().err
    src = tmp_path / "cut.safetensors"
    save_file({"w": np.ones(100, np.float32)}, str(src))
    src.write_bytes(src.read_bytes()[:-10])
    assert main(["convert", str(src), str(tmp_path / "c")]) == 2
    assert "cut.safetensors" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["convert", str(tmp_path / "notes.txt"), str(tmp_path / "c")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    good = str(tmp_path / "good.safetensors")
    save_file({"w": np.ones(2, np.float32)}, good)
    assert main(["convert", good, run_dir]) == 2
    assert "directory of checkpoints" in capsys.readouterr().err
    target = os.path.join(run_dir, "step-000000040")
    assert main(["convert", good, target]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", good, target, "--overwrite"]) == 0
    assert list(checkpointer.load(target)) == ["w"]


def test_convert_to_and_from_s3(s3, tmp_path, capsys):
    url = s3.fresh()
    src = str(tmp_path / "m.safetensors")
    save_file({"w": np.arange(4, dtype=np.float32)}, src)
    assert main(["convert", src, f"{url}/imported", *s3.args]) == 0
    state = checkpointer.load(f"{url}/imported", storage_options=s3.options)
    assert (state["w"] == np.arange(4)).all()
    assert main(["export", f"{url}/imported", f"{url}/m.safetensors", *s3.args]) == 0
    assert main(["convert", f"{url}/m.safetensors", str(tmp_path / "back"), *s3.args]) == 0
    assert (checkpointer.load(str(tmp_path / "back"))["w"] == np.arange(4)).all()
