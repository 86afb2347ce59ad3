"""torchrun worker: a small data-parallel run (DDP, dropout, Adam), whole or in two halves.

  first OUT DIR   train 6 steps and write the final state to OUT (rank 0); then, from the
                  same start, train 3 steps and save through CheckpointManager into DIR
  second DIR OUT  in fresh processes: restore, train the last 3 steps, write the final state
"""

import gc
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.adapters.torch import load_state, rng_state, set_rng_state, to_state

mode = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()


def build():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # same init and the same dropout stream on every rank
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(16, 1))
    model = DistributedDataParallel(net)
    return net, model, torch.optim.Adam(model.parameters(), lr=0.01)


def batch(step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own data
    x = torch.randn(32, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def train(model, opt, steps):
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def run():
    net, model, opt = build()
    if mode == "first":
        train(model, opt, range(6))
        if rank == 0:
            checkpointer.save(sys.argv[2], {**to_state({"model": net, "opt": opt}), "rng": rng_state()})
        net, model, opt = build()  # the same start again
        train(model, opt, range(3))
        mgr = CheckpointManager(sys.argv[3], every_n_steps=3)
        assert mgr.step_end(3, lambda: {**to_state({"model": net, "opt": opt}), "rng": rng_state(), "step": 3})
    else:
        state = CheckpointManager(sys.argv[2]).restore("latest").state
        load_state({"model": net, "opt": opt}, {"model": state["model"], "opt": state["opt"]})
        set_rng_state(state["rng"])
        train(model, opt, range(state["step"], 6))
        if rank == 0:
            checkpointer.save(sys.argv[3], {**to_state({"model": net, "opt": opt}), "rng": rng_state()})


run()
dist.barrier()
# DDP objects hold gloo work (and its tensors) in reference cycles: free them while the
# process group lives, or gloo's threads may abort at interpreter exit (a torch issue)
gc.collect()
dist.destroy_process_group()
