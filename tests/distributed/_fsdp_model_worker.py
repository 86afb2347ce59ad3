"""torchrun worker: a ``fully_shard`` model and its Adam state through ``to_state(model)``.

  save DIR REF      build (seed 0), shard, take one Adam step, save
                    ``to_state({"model": model, "optim": opt})`` through CheckpointManager;
                    rank 0 writes the full values to REF
  restore DIR OUT   build (seed 1), shard, take a step of its own, restore through
                    ``template(...)`` into the model and optimizer; rank 0 writes the full
                    values to OUT
  full DIR OUT      the same as restore, but reading full arrays (no template): every rank
                    cuts its own piece
"""

import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.adapters.torch import load_state, to_state
from checkpointer.adapters.torch_distributed import template

mode, directory, out = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # 5 and 3 rows over 2 or 4 ranks: uneven shards, one rank may hold none
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).square().sum().backward()
    opt.step()
    return model, opt


def full_values(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Every parameter and Adam moment as a full numpy array (full_tensor is a collective)."""
    values = {f"param/{k}": v.full_tensor().numpy() for k, v in model.state_dict().items()}
    for i, entry in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            values[f"{name}/{i}"] = entry[name].full_tensor().numpy()
    return values


model, opt = build(0 if mode == "save" else 1)
objs = {"model": model, "optim": opt}
before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
mgr = CheckpointManager(directory)
if mode == "save":
    info = mgr.save(to_state(objs), step=1)
    assert info is not None
    # to_state read the model without changing it
    assert all(torch.equal(before[k], v.to_local()) for k, v in model.state_dict().items())
else:
    like = template(objs) if mode == "restore" else None
    report = load_state(objs, mgr.restore("latest", template=like).state)
    assert not report, report
values = full_values(model, opt)
if dist.get_rank() == 0:
    checkpointer.save(out, values)
dist.barrier()
gc.collect()  # free cyclic torch objects while the process group lives
dist.destroy_process_group()
