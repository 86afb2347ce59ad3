"""Subprocess script: a plain PyTorch loop that is stopped, restored in a fresh process and
finished, or run straight through; it writes the final weights and optimizer state.

Usage: ``python torch_resume_script.py MODE CKPT_DIR OUT EPOCHS`` where MODE is ``full``
(train EPOCHS epochs), ``first`` (train EPOCHS // 2, saving each epoch) or ``resume``
(restore the latest checkpoint of CKPT_DIR and train up to EPOCHS).
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.adapters.torch import load_state, rng_state, set_rng_state, to_state


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(16, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor) -> float:
    model.train()
    order = torch.randperm(len(data))  # torch RNG
    noise = np.random.normal(0, 0.01, size=(len(data), 4)).astype(np.float32)  # numpy RNG
    total = 0.0
    for i in range(0, len(data), 8):
        idx = order[i : i + 8]
        x = data[idx] + torch.from_numpy(noise[idx.numpy()]) * random.random()  # Python RNG
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total


def main(mode: str, ckpt_dir: str, out: str, epochs: int) -> None:
    random.seed(1)
    np.random.seed(2)
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    model, opt, sched = build()
    objs = {"model": model, "optimizer": opt, "scheduler": sched}
    start, stop = 0, epochs
    mgr = CheckpointManager(ckpt_dir, keep_last=2) if mode != "full" else None
    if mode == "first":
        stop = epochs // 2
    elif mode == "resume":
        assert mgr is not None
        state = mgr.restore("latest").state
        load_state(objs, state)
        set_rng_state(state["rng"])
        start = state["epoch"] + 1
    for e in range(start, stop):
        epoch(model, opt, data)
        sched.step()
        if mgr is not None:
            mgr.epoch_end(e, lambda e=e: {**to_state(objs), "rng": rng_state(), "epoch": e})
    if mgr is not None:
        mgr.close()
    checkpointer.save(out, to_state({"model": model, "optimizer": opt}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
