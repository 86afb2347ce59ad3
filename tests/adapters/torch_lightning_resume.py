"""Subprocess script: Lightning training run straight through, or stopped and resumed with
``ckpt_path="last"`` in a fresh process; writes the final weights and optimizer state.

Usage: ``python torch_lightning_resume.py MODE ROOT OUT EPOCHS`` with MODE ``full``,
``first`` (EPOCHS // 2 epochs) or ``resume`` (continue to EPOCHS from ROOT/ck/last.ckpt).
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from torch_lightning_model import TinyModule, loaders, trainer  # noqa: E402

import checkpointer  # noqa: E402
from checkpointer.adapters.lightning import ModelCheckpoint, SafeCheckpointIO  # noqa: E402
from checkpointer.adapters.torch import to_state  # noqa: E402


def main(mode: str, root: str, out: str, epochs: int) -> None:
    pl.seed_everything(7, verbose=False)
    model = TinyModule()
    cb = ModelCheckpoint(
        dirpath=os.path.join(root, "ck"), monitor="val_loss", save_top_k=2, save_last=True
    )
    t = trainer(
        root, epochs // 2 if mode == "first" else epochs, [cb], plugins=[SafeCheckpointIO()]
    )
    train, val = loaders()
    t.fit(model, train, val, ckpt_path="last" if mode == "resume" else None)
    checkpointer.save(out, to_state({"model": model, "optimizer": t.optimizers[0]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
