"""Subprocess script: ModelCheckpoint under DDP (2 CPU processes, gloo).

Usage: ``python torch_lightning_ddp.py ROOT``. Each rank writes ROOT/report-RANK.json with what
it believes (best path and score, top k, last path); rank 0 also lists the checkpoint folder.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from torch_lightning_model import TinyModule, loaders, trainer  # noqa: E402

from checkpointer.adapters.lightning import ModelCheckpoint  # noqa: E402


def main(root: str) -> None:
    pl.seed_everything(0, verbose=False)
    ck = os.path.join(root, "ck")
    cb = ModelCheckpoint(dirpath=ck, monitor="val_loss", save_top_k=2, save_last=True)
    t = trainer(root, 4, [cb], strategy="ddp", devices=2, num_sanity_val_steps=0)
    t.fit(TinyModule(val_losses=[0.5, 0.3, 0.4, 0.2]), *loaders())
    report = {
        "rank": t.global_rank,
        "best": cb.best_model_path,
        "score": float(cb.best_model_score),
        "top": sorted(os.path.basename(p) for p in cb.best_k_models),
        "last": os.path.basename(cb.last_model_path),
    }
    if t.global_rank == 0:
        report["files"] = sorted(n for n in os.listdir(ck) if not n.startswith("."))
    with open(os.path.join(root, f"report-{t.global_rank}.json"), "w") as f:
        json.dump(report, f)  # a file per rank: both ranks share stdout


if __name__ == "__main__":
    main(sys.argv[1])
