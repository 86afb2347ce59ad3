"""Synchronous save: checkpointer.save beside raw os.write, safetensors, torch.save, np.savez.

The baseline is raw ``os.write`` of the same bytes into one file followed by ``fsync``
(what a durable save cannot beat). Library baselines are timed as they are called (no
fsync: they do not make files durable) and with an ``fsync`` added, for a like-for-like
comparison. ``checkpointer (no crc)`` replaces crc32c with a no-op to price the checksums.
Before every timed call the target is removed (untimed; unlinking also drops an unsynced
file's dirty pages), so no call pays for an earlier one's writeback.

Run alone: ``python benchmarks/bench_save.py [--large] [--rounds N]``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer import format as fmt  # noqa: E402


def _torch_tensors(state: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    out = {}
    for k, a in state.items():
        if a.dtype.name == "bfloat16":
            out[k] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(a)
    return out


def _npz_arrays(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # np.save has no bfloat16: store its bits, as a numpy user would
    return {
        k.replace("/", "_"): (a.view(np.uint16) if a.dtype.name == "bfloat16" else a)
        for k, a in state.items()
    }


def methods(
    state: dict[str, np.ndarray], d: str
) -> tuple[dict[str, common.Method], dict[str, str]]:
    """The save methods for ``state`` writing under ``d``, and the path each one writes."""
    import torch
    from safetensors.numpy import save_file

    arrays = list(state.values())
    tt, npz = _torch_tensors(state), _npz_arrays(state)
    paths = {
        "raw os.write+fsync": "raw.bin",
        "raw os.write": "raw.bin",
        "checkpointer": "ck",
        "checkpointer (no crc)": "ck",
        "safetensors save_file": "st.safetensors",
        "safetensors save_file+fsync": "st.safetensors",
        "torch.save": "t.pt",
        "torch.save+fsync": "t.pt",
        "np.savez": "n.npz",
        "np.savez+fsync": "n.npz",
    }
    p = {k: os.path.join(d, v) for k, v in paths.items()}

    def no_crc() -> None:
        real = fmt.crc32c
        fmt.crc32c = lambda data, value=0: 0  # type: ignore[assignment]
        try:
            checkpointer.save(p["checkpointer (no crc)"], state)
        finally:
            fmt.crc32c = real

    def then_sync(fn: Any, path: str) -> common.Method:
        return lambda: (fn(), common.fsync_path(path))

    m: dict[str, common.Method] = {
        "raw os.write+fsync": lambda: common.raw_write(p["raw os.write"], arrays, True),
        "raw os.write": lambda: common.raw_write(p["raw os.write"], arrays, False),
        "checkpointer": lambda: checkpointer.save(p["checkpointer"], state),
        "checkpointer (no crc)": no_crc,
        "safetensors save_file": lambda: save_file(state, p["safetensors save_file"]),
        "safetensors save_file+fsync": then_sync(
            lambda: save_file(state, p["safetensors save_file"]), p["safetensors save_file"]
        ),
        "torch.save": lambda: torch.save(tt, p["torch.save"]),
        "torch.save+fsync": then_sync(lambda: torch.save(tt, p["torch.save"]), p["torch.save"]),
        "np.savez": lambda: np.savez(p["np.savez"], **npz),
        "np.savez+fsync": then_sync(lambda: np.savez(p["np.savez"], **npz), p["np.savez"]),
    }
    return m, p


def run(large: bool = False, rounds: int = 3, only: list[str] | None = None) -> list[common.Row]:
    rows = []
    d = os.path.join(common.workdir(), "save")
    os.makedirs(d, exist_ok=True)
    for name, state in common.states(large, only).items():
        m, p = methods(state, d)

        def setup(method: str, p: dict[str, str] = p) -> None:
            common.remove(p[method])  # unlinking drops an unsynced file's dirty pages too

        times = common.bench(m, rounds=rounds, setup=setup)
        rows += common.rows_from(
            "save",
            name,
            common.nbytes_of(state),
            times,
            "raw os.write+fsync",
            {"checkpointer": "durable: fsync files+dirs, rename", "raw os.write": "not durable"},
        )
        for path in set(p.values()):
            common.remove(path)
        del state, m
    return rows


def main() -> None:
    common.state_scenario_main(__doc__, run)


if __name__ == "__main__":
    main()
