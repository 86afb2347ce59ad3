"""Eager load: checkpointer.load beside raw readinto, safetensors, torch.load, np.load.

Each state is written once by every method. Warm: files in the page cache. Cold: before
each timed call the method's files are fsynced and evicted with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (untimed). The baseline is one ``readinto`` loop
of the raw bytes into a freshly allocated buffer (a loader has to return fresh memory);
``raw readinto (preallocated)`` reads into one buffer allocated and touched beforehand (no
page faults: the floor of any read);
``checkpointer`` verifies every checksum, ``checkpointer (verify=False)`` skips them.

Run alone: ``python benchmarks/bench_load.py [--large] [--rounds N]``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_save  # noqa: E402
import common  # noqa: E402

import checkpointer  # noqa: E402


def _write_all(state: dict[str, np.ndarray], d: str) -> dict[str, str]:
    import torch
    from safetensors.numpy import save_file

    p = {
        "raw": os.path.join(d, "raw.bin"),
        "ck": os.path.join(d, "ck"),
        "st": os.path.join(d, "st.safetensors"),
        "pt": os.path.join(d, "t.pt"),
        "npz": os.path.join(d, "n.npz"),
    }
    common.raw_write(p["raw"], list(state.values()), True)
    checkpointer.save(p["ck"], state)
    save_file(state, p["st"])
    torch.save(bench_save._torch_tensors(state), p["pt"])
    np.savez(p["npz"], **bench_save._npz_arrays(state))
    return p


def _np_load_all(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _safe_open_all(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def methods(p: dict[str, str]) -> tuple[dict[str, common.Method], dict[str, str]]:
    """``(methods, files each reads)``; names ending in ``(cold)`` read evicted files."""
    import torch
    from safetensors.numpy import load_file

    ready = np.ones(os.path.getsize(p["raw"]), dtype=np.uint8)  # allocated and faulted in once
    warm: dict[str, tuple[common.Method, str]] = {
        "raw readinto": (lambda: common.raw_readinto(p["raw"]), p["raw"]),
        "raw readinto (preallocated)": (lambda: common.raw_readinto(p["raw"], ready), p["raw"]),
        "checkpointer": (lambda: checkpointer.load(p["ck"]), p["ck"]),
        "checkpointer (verify=False)": (lambda: checkpointer.load(p["ck"], verify=False), p["ck"]),
        "safetensors load_file": (lambda: load_file(p["st"]), p["st"]),
        "safetensors safe_open": (lambda: _safe_open_all(p["st"]), p["st"]),
        "torch.load(weights_only)": (lambda: torch.load(p["pt"], weights_only=True), p["pt"]),
        "np.load": (lambda: _np_load_all(p["npz"]), p["npz"]),
    }
    cold_names = [
        "raw readinto",
        "checkpointer",
        "safetensors load_file",
        "torch.load(weights_only)",
    ]
    m = {k: v[0] for k, v in warm.items()}
    files = {k: v[1] for k, v in warm.items()}
    for k in cold_names:
        m[f"{k} (cold)"], files[f"{k} (cold)"] = warm[k]
    return m, files


def run(large: bool = False, rounds: int = 3, only: list[str] | None = None) -> list[common.Row]:
    rows = []
    d = os.path.join(common.workdir(), "load")
    os.makedirs(d, exist_ok=True)
    for name, state in common.states(large, only).items():
        nbytes = common.nbytes_of(state)
        p = _write_all(state, d)
        del state
        m, files = methods(p)

        def setup(method: str, files: dict[str, str] = files) -> None:
            if method.endswith("(cold)"):
                common.drop_cache(files[method])

        times = common.bench(m, rounds=rounds, setup=setup)
        warm = {k: v for k, v in times.items() if not k.endswith("(cold)")}
        cold = {k: v for k, v in times.items() if k.endswith("(cold)")}
        rows += common.rows_from("load warm", name, nbytes, warm, "raw readinto")
        rows += common.rows_from("load cold", name, nbytes, cold, "raw readinto (cold)")
        for path in p.values():
            common.remove(path)
    return rows


def main() -> None:
    common.state_scenario_main(__doc__, run)


if __name__ == "__main__":
    main()
