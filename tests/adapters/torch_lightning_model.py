"""A tiny LightningModule and trainer factory shared by the Lightning tests and scripts."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(pl.LightningModule):
    """A 2-layer MLP with dropout, Adam and StepLR; logs ``val_loss`` from a fixed schedule
    when ``val_losses`` is given (so tests control the ranking), else the real loss."""

    def __init__(self, val_losses: list[float] | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1)
        )
        self.val_losses = val_losses

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.val_losses is not None:
            loss = torch.tensor(self.val_losses[self.current_epoch % len(self.val_losses)])
        self.log("val_loss", loss)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]


def loaders(n: int = 32, batch: int = 8) -> tuple[DataLoader, DataLoader]:
    """Deterministic data; the train loader shuffles (drawing on torch's global RNG)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch, shuffle=True), DataLoader(ds, batch_size=16)


def trainer(root: str, max_epochs: int, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    """A quiet CPU trainer (one device unless ``devices`` is given)."""
    kw.setdefault("devices", 1)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=root,
        **kw,
    )
