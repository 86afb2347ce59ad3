"""A torchrun worker: every rank makes the same manager calls; rank 0 alone writes."""

import json
import os
import sys

import numpy as np
import torch.distributed as dist

from checkpointer import CheckpointManager

directory, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
calls = []


def state():
    calls.append(rank)
    return {"w": np.full(4, 7.0, np.float32), "rank": rank}


mgr = CheckpointManager(directory, monitor="val_loss", keep_best=1, keep_last=1)
decisions = []
for epoch in range(1, 6):
    # metrics differ slightly between ranks: rank 0's decide for everyone
    loss = [0.5, 0.4, 0.45, 0.3, 0.35][epoch - 1] + rank * 1e-3
    info = mgr.epoch_end(epoch, state, metrics={"val_loss": loss})
    decisions.append(None if info is None else info.name)
ckpt = mgr.restore("best")
mgr.close()
result = {"rank": rank, "decisions": decisions, "names": [c.name for c in mgr.checkpoints],
          "best": mgr.best.name, "restored": ckpt.info.name, "restored_rank": int(ckpt.state["rank"]),
          "state_calls": len(calls), "pid": os.getpid()}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
