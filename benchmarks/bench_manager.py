"""Many small saves through the manager: a 1 MiB state saved 100 times.

What a training loop that checkpoints a small model often pays per save point: the
manager's fixed costs (manifest, folder syncs, the rename, the index, retention) on top of
the bytes. Methods, each making 100 durable saves into a clean folder (untimed):

- ``safetensors save_file+fsync`` (the baseline): 100 files, each fsynced;
- ``raw os.write+fsync``: the same bytes as one file each, fsynced;
- ``CheckpointManager.save``: ``keep_last=3``, so from the fourth save on each save also
  drops the oldest checkpoint (on the background deleter; ``wait()`` ends the timing).

Run alone: ``python benchmarks/bench_manager.py [--rounds N] [--saves N]``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import checkpointer  # noqa: E402

BASELINE = "safetensors save_file+fsync"


def run(large: bool = False, rounds: int = 3, saves: int = 100) -> list[common.Row]:
    from safetensors.numpy import save_file

    state = common.mixed_state(common.MiB, n=16, seed=5)
    arrays = list(state.values())
    d = os.path.join(common.workdir(), "manager")
    folders = {name: os.path.join(d, name.split()[0]) for name in (BASELINE, "raw", "manager")}

    def safetensors_saves() -> None:
        for i in range(saves):
            path = os.path.join(folders[BASELINE], f"{i}.safetensors")
            save_file(state, path)
            common.fsync_path(path)

    def raw_saves() -> None:
        for i in range(saves):
            common.raw_write(os.path.join(folders["raw"], f"{i}.bin"), arrays, True)

    def manager_saves() -> None:
        with checkpointer.CheckpointManager(folders["manager"], keep_last=3) as manager:
            for i in range(saves):
                manager.save(state, step=i)

    methods = {BASELINE: safetensors_saves, "raw os.write+fsync": raw_saves,
               "CheckpointManager.save": manager_saves}  # fmt: skip
    where = {BASELINE: folders[BASELINE], "raw os.write+fsync": folders["raw"],
             "CheckpointManager.save": folders["manager"]}  # fmt: skip

    def setup(name: str) -> None:
        common.remove(where[name])
        os.makedirs(where[name])

    times = common.bench(methods, rounds=rounds, setup=setup)
    common.remove(d)
    notes = {"CheckpointManager.save": "keep_last=3: drops the oldest from the 4th save on"}
    return common.rows_from(f"{saves} saves", "f32x16-1MiB", common.nbytes_of(state) * saves,
                            times, BASELINE, notes)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--saves", type=int, default=100)
    args = ap.parse_args()
    rows = run(rounds=args.rounds, saves=args.saves)
    print(common.table(rows))
    common.dump(rows, "manager")


if __name__ == "__main__":
    main()
