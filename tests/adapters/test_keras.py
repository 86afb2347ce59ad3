"""The Keras adapter on every Keras 3 backend.

Keras reads ``KERAS_BACKEND`` once, at import, so each backend runs the case modules
(``keras_cases_state.py``: to_state/load_state, BackupAndRestore; ``keras_cases_contract.py``:
the adapter contract of ``contract_lib.py``; ``keras_cases_ckpt.py``:
ModelCheckpoint, the README examples against Keras's own callback, Keras's four
misbehaviours) in its own pytest subprocess. The three subprocesses start together and each
parametrized test waits for its own, so the suite costs about one backend's time where cores
allow. This process never imports Keras.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CASES = ["keras_cases_state.py", "keras_cases_ckpt.py", "keras_cases_contract.py",
         "keras_cases_runs.py"]
BACKENDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}
TIMEOUT = 400


def _available(module: str) -> bool:
    return (
        importlib.util.find_spec(module) is not None
        and importlib.util.find_spec("keras") is not None
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    procs = {}
    for backend, module in BACKENDS.items():
        if not _available(module):
            continue
        env = {
            **os.environ,
            "KERAS_BACKEND": backend,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_PLATFORMS": "cpu",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONHASHSEED": "0",
        }
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *[str(HERE / c) for c in CASES],
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::DeprecationWarning",
            "--basetemp",
            str(tmp_path_factory.mktemp(f"keras-{backend}")),
        ]
        procs[backend] = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(HERE.parent.parent),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_keras_adapter_on_backend(runs: dict[str, subprocess.Popen[str]], backend: str) -> None:
    if backend not in runs:
        pytest.skip(f"keras or {BACKENDS[backend]} is not installed")
    proc = runs[backend]
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"KERAS_BACKEND={backend}: cases timed out\n{out[-4000:]}")
    assert proc.returncode == 0, f"KERAS_BACKEND={backend}: cases failed\n{out[-6000:]}"
    assert " passed" in out and " skipped" not in out, out[-2000:]


def test_missing_keras_is_an_import_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # makes `import keras` fail
    monkeypatch.delitem(sys.modules, "checkpointer.adapters.keras", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'checkpointer-engine\[keras\]'"):
        importlib.import_module("checkpointer.adapters.keras")
