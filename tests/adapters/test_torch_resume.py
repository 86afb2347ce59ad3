"""Exact resume of a plain PyTorch loop across processes, and what a torch checkpoint is on
storage: standard safetensors, loadable without torch, written without pickle."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import checkpointer  # noqa: E402
from checkpointer.adapters.torch import to_state  # noqa: E402
from checkpointer.tree import flatten  # noqa: E402

HERE = Path(__file__).parent
ADAPTERS = Path(checkpointer.__file__).parent.parent / "adapters"


def _script():
    spec = importlib.util.spec_from_file_location(
        "torch_resume_script", HERE / "torch_resume_script.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def assert_bit_identical(a: object, b: object) -> None:
    """Same skeleton (every plain value) and the same bytes in every array."""
    (skel_a, arrays_a), (skel_b, arrays_b) = flatten(a), flatten(b)
    assert skel_a == skel_b
    assert [k for k, _ in arrays_a] == [k for k, _ in arrays_b]
    for (key, x), (_, y) in zip(arrays_a, arrays_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), f"{key} differs"


def test_plain_loop_resumes_bit_for_bit_in_a_fresh_process(tmp_path: Path) -> None:
    script = _script()
    script.main("full", str(tmp_path / "unused"), str(tmp_path / "full"), 6)
    script.main("first", str(tmp_path / "ckpts"), str(tmp_path / "half"), 6)
    saved = sorted(p.name for p in (tmp_path / "ckpts").iterdir() if not p.name.startswith("."))
    assert saved == ["epoch-000001", "epoch-000002"]  # keep_last=2 of epochs 0..2
    _run(
        str(HERE / "torch_resume_script.py"),
        "resume",
        str(tmp_path / "ckpts"),
        str(tmp_path / "resumed"),
        "6",
    )

    full, resumed = checkpointer.load(tmp_path / "full"), checkpointer.load(tmp_path / "resumed")
    half = checkpointer.load(tmp_path / "half")
    assert_bit_identical(full, resumed)
    assert full["optimizer"]["state"]["0"]["step"] == 6 * 8  # 6 epochs of 8 batches
    assert not np.array_equal(full["model"]["0.weight"], half["model"]["0.weight"])


@pytest.fixture()
def torch_ckpt(tmp_path: Path) -> tuple[Path, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    path = tmp_path / "ckpt"
    checkpointer.save(path, to_state({"model": model, "optimizer": opt}))
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_weights_open_with_safetensors_torch(torch_ckpt: tuple[Path, dict]) -> None:
    from safetensors.torch import load_file

    path, weights = torch_ckpt
    loaded: dict = {}
    for f in sorted(path.glob("*.safetensors")):
        loaded.update(load_file(str(f)))
    for name, tensor in weights.items():
        assert loaded[f"model/{name}"].dtype == torch.bfloat16
        assert torch.equal(loaded[f"model/{name}"], tensor)


def test_checkpoint_loads_where_torch_is_blocked(torch_ckpt: tuple[Path, dict]) -> None:
    path, weights = torch_ckpt
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import checkpointer
        state = checkpointer.load({str(path)!r})
        w = state["model"]["0.weight"]
        assert "torch" not in {{m for m in sys.modules if sys.modules[m] is not None}}
        print(w.dtype, w.shape, state["optimizer"]["state"]["0"]["step"], w.view("uint16").sum())
    """)
    out = _run("-c", code).stdout.split()
    expected = weights["0.weight"].view(torch.int16).numpy().view(np.uint16).sum()
    assert out == ["bfloat16", "(4,", "3)", "1.0", str(expected)]


def test_adapter_without_torch_names_the_extra() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        try:
            import checkpointer.adapters.torch
        except ImportError as exc:
            print(exc)
    """)
    assert "pip install 'checkpointer-engine[torch]'" in _run("-c", code).stdout


@pytest.mark.parametrize(
    "name", ["torch.py", "_torch_codec.py", "lightning.py", "_torch_lightning_io.py"]
)
def test_adapters_never_pickle(name: str) -> None:
    tree = ast.parse((ADAPTERS / name).read_text())
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not imported & {"pickle", "cloudpickle", "dill", "joblib"}
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not calls & {"torch.save", "torch.load", "pickle.dumps", "pickle.loads"}
