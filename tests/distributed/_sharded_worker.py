"""torchrun worker for sharded saves: FSDP2 (fully_shard) parameters and DTensors.

Modes:
  save DIR REF     build the model (seed 0), record its full weights in REF, shard it over
                   every rank, save twice through CheckpointManager
  restore DIR OUT  build the model with another seed, shard it, restore the latest
                   checkpoint through a template, write the full weights to OUT
  kill DIR         save once, then rank 1 dies while writing its part of the second save
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import checkpointer
from checkpointer import CheckpointManager, commit
from checkpointer.adapters.torch import load_state, to_state
from checkpointer.adapters.torch_distributed import template

mode, directory = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 10 and 7 rows do not divide evenly over 4 ranks: uneven shards
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7))
    model = model.to(torch.bfloat16) if os.environ.get("BF16") else model
    return model


def state_dict(model: torch.nn.Module) -> dict:
    sd = dict(model.state_dict())
    torch.manual_seed(123)
    sd["table"] = distribute_tensor(torch.randn(9, 4), mesh, [Shard(1)])
    sd["replicated"] = distribute_tensor(torch.arange(5.0), mesh, [Replicate()])
    return sd


def full(sd: dict) -> dict:
    return {k: v.full_tensor().float().numpy() for k, v in sd.items()}


if mode == "save":
    model = build(0)
    fully_shard(model, mesh=mesh)
    sd = state_dict(model)
    if rank == 0:
        checkpointer.save(sys.argv[3], full(sd))
    else:
        full(sd)  # full_tensor is a collective
    mgr = CheckpointManager(directory)
    mgr.save(to_state(sd), step=1)
    mgr.save(to_state(sd), step=2)
elif mode == "restore":
    model = build(1)
    fully_shard(model, mesh=mesh)
    sd = state_dict(model)
    mgr = CheckpointManager(directory)
    ckpt = mgr.restore("latest", template=template(sd))
    load_state(sd, ckpt.state)
    weights = full(sd)
    if rank == 0:
        checkpointer.save(sys.argv[3], weights)
elif mode == "kill":
    model = build(0)
    fully_shard(model, mesh=mesh)
    sd = state_dict(model)
    mgr = CheckpointManager(directory)
    mgr.save(to_state(sd), step=1)
    if rank == 1:
        real = commit.write_rank_files

        def die(*args, **kwargs):
            real(*args, **kwargs)  # its data is on disk, the manifest is not
            os._exit(9)
        import checkpointer.collective as collective
        collective.write_rank_files = die
    mgr.save(to_state(sd), step=2)
dist.barrier()
gc.collect()  # free cyclic torch objects while the process group lives
dist.destroy_process_group()
