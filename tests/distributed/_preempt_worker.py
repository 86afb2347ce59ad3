"""torchrun worker: a DDP training loop with ``save_on_preemption=True`` that a signal stops.

  DIR OUT MODE...   one run per MODE ("sync" or "async"), one after another, run i in
                    DIR/run{i}. Every rank trains a DDP model and a DTensor table sharded
                    over the ranks, with ``every_n_steps`` far away (no scheduled save
                    comes); once run i's manager is built (handlers installed) each rank
                    writes its pid to OUT/pid{i}-{rank}, and the parent sends SIGTERM to one
                    rank's pid. Every rank stops when ``mgr.preempted`` and writes
                    OUT/rank{i}-{rank}.json: the step at which its own handler saw the
                    signal (None on a rank not signalled), the step it stopped at, and what
                    the manager returned.
"""

import gc
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from checkpointer import CheckpointManager
from checkpointer.adapters.torch import to_state

directory, out, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
MAX_STEPS = 5000  # ~10 s: the parent signals long before; a lost signal ends the loop here
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
current = {"step": 0, "at_signal": None}


def note(signum, frame):  # installed before the manager: the manager's handler chains it
    if current["at_signal"] is None:
        current["at_signal"] = current["step"]


signal.signal(signal.SIGTERM, note)
torch.manual_seed(0)
model = DistributedDataParallel(torch.nn.Linear(8, 4))
optim = torch.optim.SGD(model.parameters(), lr=0.01)
# the table's global value after step s is base + s; each rank holds (and writes) 4 rows
base = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4)


def train(run: int, mode: str) -> dict:
    current.update(step=0, at_signal=None)
    table = distribute_tensor(base.clone(), mesh, [Shard(0)])
    mgr = CheckpointManager(os.path.join(directory, f"run{run}"), every_n_steps=100_000,
                            async_save=mode == "async", save_on_preemption=True)
    with open(os.path.join(out, f"pid{run}-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    returned, stopped, info = [], None, None
    for step in range(1, MAX_STEPS + 1):
        current["step"] = step
        loss = model(torch.randn(16, 8)).pow(2).mean()
        optim.zero_grad()
        loss.backward()  # DDP's all-reduce of the gradients
        optim.step()
        table.to_local().add_(1.0)
        time.sleep(0.002)
        info = mgr.step_end(step, lambda step=step: to_state({"model": model.module, "table": table, "step": step}))
        returned.append(None if info is None else info.step)
        if mgr.preempted:
            stopped = step
            break
    later = mgr.step_end((stopped or MAX_STEPS) + 1, {"never": torch.zeros(1)})  # the same info
    mgr.close()
    return {"rank": rank, "pid": os.getpid(), "at_signal": current["at_signal"], "stopped": stopped,
            "saved": [s for s in returned if s is not None], "name": None if info is None else info.name,
            "later": None if later is None else later.name,
            "nbytes": mgr.latest.nbytes if mgr.latest else 0, "names": [c.name for c in mgr.checkpoints]}


for run, mode in enumerate(modes):
    result = train(run, mode)
    with open(os.path.join(out, f"rank{run}-{rank}.json"), "w") as f:
        json.dump(result, f)
dist.barrier()
# free the torch objects (DTensors, work handles in reference cycles) while the process
# group lives: gloo's threads may otherwise abort at interpreter exit (a torch issue)
gc.collect()
dist.destroy_process_group()
