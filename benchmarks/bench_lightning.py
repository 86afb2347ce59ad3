"""Save latency of a tiny model per save point: our Lightning callback beside Lightning's own.

A ``Trainer`` fits a tiny module (``Linear(32, 2)`` + SGD, as Lightning's ``BoringModel``)
on CPU and saves at every training step (``every_n_train_steps=1, save_top_k=-1``). Each
save point is timed inside the callback's ``_save_checkpoint`` (the trainer dumps its
state, the ``CheckpointIO`` writes it), and the write alone inside the plugin's
``save_checkpoint``. Variants, in alternating order each round, in one process:

- ``lightning``: Lightning's ``ModelCheckpoint`` and ``TorchCheckpointIO`` (``torch.save``
  of one pickle file, no fsync);
- ``ours``: ``checkpointer.adapters.lightning.ModelCheckpoint`` (``SafeCheckpointIO``: a
  folder of safetensors + manifest, each file and the folder fsynced, renamed into place);
- ``ours, no fsync``: the same with ``os.fsync`` made a no-op, which attributes the
  difference (there is no index write: a Lightning ``dirpath`` holds no index).

Run alone: ``python benchmarks/bench_lightning.py [--rounds N] [--steps N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from checkpointer.adapters.lightning import ModelCheckpoint


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def _timed(obj: Any, name: str, into: list[float]) -> None:
    """Wrap ``obj.name`` so that each call's duration is appended to ``into``."""
    inner: Callable[..., Any] = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(obj, name, wrapper)


def run(variant: str, steps: int) -> tuple[list[float], list[float]]:
    """Per-save-point and per-write seconds of one fit of ``steps`` steps."""
    root = tempfile.mkdtemp(prefix="bench-lightning-")
    cls = LightningModelCheckpoint if variant == "lightning" else ModelCheckpoint
    cb = cls(dirpath=os.path.join(root, "ck"), every_n_train_steps=1, save_top_k=-1)
    points: list[float] = []
    writes: list[float] = []
    _timed(cb, "_save_checkpoint", points)

    class WriteTimer(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            _timed(trainer.strategy.checkpoint_io, "save_checkpoint", writes)

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[cb, WriteTimer()],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=root)  # fmt: skip
    data = DataLoader(TensorDataset(torch.randn(steps * 4, 32)), batch_size=4)
    with _no_fsync() if variant == "ours, no fsync" else contextlib.nullcontext():
        trainer.fit(Tiny(), data)
    return points, writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    variants = ["lightning", "ours", "ours, no fsync"]
    points: dict[str, list[float]] = {v: [] for v in variants}
    writes: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % 3:] + variants[:r % 3]:  # a different order each round
            p, w = run(v, args.steps)
            points[v] += p[1:]  # the first save warms up imports and caches
            writes[v] += w[1:]
    base = statistics.median(points["lightning"])
    print(f"per save point, median of {len(points['lightning'])} saves (tiny model, CPU):")
    print(f"{'variant':<16} {'save point ms':>14} {'write ms':>10} {'vs lightning':>13}")
    for v in variants:
        med = statistics.median(points[v])
        print(f"{v:<16} {med * 1e3:>14.2f} {statistics.median(writes[v]) * 1e3:>10.2f} "
              f"{med / base:>12.2f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
