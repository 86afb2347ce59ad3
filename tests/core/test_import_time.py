"""Start-up cost (issue 14): ``ml_dtypes`` alone took 1.5 s of a 1.75 s ``import
checkpointer``, so it is imported only when a bfloat16/float8 dtype is looked up. What is
asserted is which modules a fresh process has imported, never a time
(``benchmarks/bench_import.py`` measures the times)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("ml_dtypes", "torch", "jax", "keras", "tensorflow")


def _fresh(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of HEAVY it had imported at the end."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import checkpointer",
    "from checkpointer import CheckpointManager, save, load",
    "import contextlib, io\nfrom checkpointer.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
    "    main(['--help'])",
])
def test_start_up_imports_nothing_heavy(code: str) -> None:
    assert _fresh(code) == dict.fromkeys(HEAVY, False)


def test_a_float32_save_does_not_import_ml_dtypes(tmp_path: Path) -> None:
    code = ("import numpy as np, checkpointer\n"
            f"checkpointer.save({str(tmp_path / 'c')!r}, {{'w': np.arange(4, dtype=np.float32)}})")
    assert not _fresh(code)["ml_dtypes"]


def test_bfloat16_still_round_trips_when_first_seen_on_load(tmp_path: Path) -> None:
    """A fresh process that has not imported ml_dtypes loads a bfloat16 checkpoint: the
    dtype table resolves it on that first lookup."""
    import ml_dtypes
    import numpy as np

    import checkpointer

    want = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
    checkpointer.save(tmp_path / "bf", {"w": want, "f8": want.astype(ml_dtypes.float8_e4m3fn)})
    code = ("import checkpointer, sys\n"
            "assert 'ml_dtypes' not in sys.modules\n"
            f"tree = checkpointer.load({str(tmp_path / 'bf')!r})\n"
            "print(tree['w'].dtype.name, tree['f8'].dtype.name, tree['w'].astype('f4').tolist())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert out[:2] == ["bfloat16", "float8_e4m3fn"]
    assert out[2] == "[0.0," and "5.0]" in out[-1]


def test_the_dtype_table_is_a_mapping_of_every_allowed_name() -> None:
    from checkpointer.dtypes import ITEMSIZE, SAFETENSORS_TO_NUMPY, numpy_to_safetensors

    assert sorted(SAFETENSORS_TO_NUMPY) == sorted(ITEMSIZE) and len(SAFETENSORS_TO_NUMPY) == 16
    for code, dtype in SAFETENSORS_TO_NUMPY.items():
        assert dtype.itemsize == ITEMSIZE[code], code
        assert numpy_to_safetensors(dtype) == code
    assert "F8_E4M3" in SAFETENSORS_TO_NUMPY and "X9" not in SAFETENSORS_TO_NUMPY
    assert SAFETENSORS_TO_NUMPY.get("X9") is None
    with pytest.raises(KeyError):
        SAFETENSORS_TO_NUMPY["X9"]


def test_a_float32_save_and_load_import_no_ml_dtypes(tmp_path: Path) -> None:
    import numpy as np

    import checkpointer

    checkpointer.save(tmp_path / "c", {"w": np.arange(4, dtype=np.float32)})
    code = f"import checkpointer\ncheckpointer.load({str(tmp_path / 'c')!r})\n" \
           f"checkpointer.CheckpointManager({str(tmp_path)!r}).checkpoints"
    assert not _fresh(code)["ml_dtypes"]
