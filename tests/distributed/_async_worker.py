"""torchrun worker: asynchronous saves of replicated and DTensor-sharded state.

  DIR OUT   every rank saves 3 times with async_save=True, runs collectives of its own
            while each save is in flight, then overwrites its arrays; OUT/rank{r}.json
            records which threads wrote and what the manager reports
"""

import gc
import json
import os
import sys
import threading

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from checkpointer import CheckpointManager, collective, commit
from checkpointer.adapters.torch import to_state
from checkpointer.distributed import KeyValueCoordinator

directory, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
writers = []


def spy(real):
    def run(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return real(*args, **kwargs)
    return run


commit.write_checkpoint = spy(commit.write_checkpoint)
collective.write_rank_files = spy(collective.write_rank_files)


def run() -> dict:
    mgr = CheckpointManager(directory, async_save=True, keep_last=2)
    assert isinstance(mgr._bg, KeyValueCoordinator)  # over the store, not a process group
    returned_before_commit = []
    for step in range(1, 4):
        replicated = torch.full((64,), float(step))
        table = distribute_tensor(torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4) * step, mesh, [Shard(0)])
        info = mgr.save(to_state({"replicated": replicated, "table": table, "step": step}), step=step)
        returned_before_commit.append(info.nbytes == 0)
        total = torch.ones(1)
        for _ in range(20):  # the training loop's own collectives, while the save is in flight
            dist.all_reduce(total)
        assert int(total.item()) == world ** 20
        replicated.fill_(-1)  # mutation after the call: never in the checkpoint
        table.to_local().fill_(-1)
    mgr.close()  # releases the writers' coordinator; a later save makes a new one
    group = mgr._bg
    info = mgr.save(to_state({"replicated": torch.full((64,), 4.0), "table": table, "step": 4}), step=4)
    returned_before_commit.append(info.nbytes == 0)
    assert mgr._bg is not None and mgr._bg is not group
    mgr.close()
    return {"writers": writers, "names": [c.name for c in mgr.checkpoints],
            "async": returned_before_commit, "latest_bytes": mgr.latest.nbytes}


with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(run(), f)
dist.barrier()
# free the torch objects (DTensors, work handles in reference cycles) while the process
# group lives: gloo's threads may otherwise abort at interpreter exit (a torch issue)
gc.collect()
dist.destroy_process_group()
