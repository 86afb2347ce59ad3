"""Lightning integration: a ``ModelCheckpoint`` callback and a ``SafeCheckpointIO`` plugin.

The callback *is* Lightning's ``ModelCheckpoint`` (arguments, hooks, schedule, top k,
``-v1`` names, ``save_on_exception``, state, errors), and this library writes every byte:
each save is ``trainer.save_checkpoint`` -> the strategy (gathering the state, collectively
where FSDP or DeepSpeed need it) -> :class:`SafeCheckpointIO` -> the core's commit protocol.
The callback adds preemption saves and RNG states; it writes, commits, indexes and ranks
nothing itself. Deviations: docs/torch.md, "Deviations from Lightning's ``ModelCheckpoint``".
The torch verbs (``to_state``, ``load_state``, ``save``, ``load``) are re-exported.
"""

# No ``from __future__ import annotations``: LightningCLI (jsonargparse) reads the real
# annotations of ``__init__``.
from ._require import require

with require(__name__, "Lightning", "lightning"):
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

import os
import shutil
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import fsspec

from checkpointer.errors import ConfigurationError
from checkpointer.preemption import DEFAULT_SIGNALS

from ._lightning_load import SafeLoading, install_checkpoint_io, load_from_checkpoint
from ._lightning_preempt import LightningPreemption
from ._torch_lightning_io import SafeCheckpointIO, decode_checkpoint, encode_checkpoint
from .torch import load, load_state, rng_state, save, set_rng_state, to_state

__all__ = ["ModelCheckpoint", "SafeCheckpointIO", "LightningConfigurationError", "SafeLoading",
           "load_from_checkpoint", "encode_checkpoint", "decode_checkpoint",
           "to_state", "load_state", "save", "load"]  # fmt: skip


class LightningConfigurationError(ConfigurationError, MisconfigurationException):
    """An invalid ``ModelCheckpoint`` option: this library's ``ConfigurationError`` (a
    ``ValueError``) and Lightning's ``MisconfigurationException`` at once."""


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, writing this library's format (no pickle).

    Each checkpoint is a folder ``<dirpath>/<name>.ckpt/``; ``trainer.fit(ckpt_path=...)``
    reads it through :class:`SafeCheckpointIO`, :func:`load_from_checkpoint` (or the
    :class:`SafeLoading` mixin) replaces ``Model.load_from_checkpoint``. Extra keyword-only
    arguments: ``async_save`` (Lightning's ``AsyncCheckpointIO``, removals kept in order),
    ``storage_options`` (fsspec), ``restore_rng`` (RNG states in the callback state, restored
    when a single-process run resumes: bit-exact resumes) and ``save_on_preemption`` /
    ``preemption_signals`` (:mod:`._lightning_preempt`).

    Raises:
        LightningConfigurationError: an invalid option (also ``MisconfigurationException``).
        ConfigurationError: at ``setup``, a ``CheckpointIO`` plugin writing another format.

    Example::

        ckpt = ModelCheckpoint(dirpath="ckpts", monitor="val_loss", save_top_k=2, save_last=True)
        Trainer(callbacks=[ckpt]).fit(model, ckpt_path="last")
        best = load_from_checkpoint(MyModel, ckpt.best_model_path)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        *,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        restore_rng: bool = True,
        save_on_preemption: bool = False,
        preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS,
    ) -> None:
        try:
            path = None if dirpath is None else os.fspath(dirpath)
            super().__init__(path, filename, monitor, verbose, save_last, save_top_k,
                             save_on_exception, save_weights_only, mode, auto_insert_metric_name,
                             every_n_train_steps, train_time_interval, every_n_epochs,
                             save_on_train_epoch_end, enable_version_counter)  # fmt: skip
        except MisconfigurationException as exc:
            raise LightningConfigurationError(f"ModelCheckpoint: {exc}") from exc
        for name, flag in (("async_save", async_save), ("restore_rng", restore_rng)):
            if not isinstance(flag, bool):
                raise LightningConfigurationError(f"{name} must be a bool, got {flag!r}")
        self._async_save, self._storage_options = async_save, storage_options
        self._restore_rng, self._pending_rng = restore_rng, None
        self._preemption = LightningPreemption(save_on_preemption, preemption_signals)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install :class:`SafeCheckpointIO` (or refuse a foreign plugin), then Lightning's
        setup (``dirpath``, the "not empty" warning)."""
        install_checkpoint_io(trainer, self._async_save, self._storage_options)
        super().setup(trainer, pl_module, stage)
        if self._storage_options and self.dirpath is not None:
            self._fs = fsspec.core.url_to_fs(str(self.dirpath), **self._storage_options)[0]

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """Lightning's save (``trainer.save_checkpoint``), the plugin installed first when
        ``setup`` has not run (a save must never fall back to pickle)."""
        install_checkpoint_io(trainer, self._async_save, self._storage_options)
        super()._save_checkpoint(trainer, filepath)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Lightning's candidates for ``ckpt_path="last"``; remotely, each folder's manifest
        (Lightning compares ``fs.modified()``, which object stores answer for files only)."""
        found: set[str] = super()._find_last_checkpoints(trainer)
        root = str(self.dirpath).rstrip("/")
        if "://" in root:
            found = {f"{root}/{p.rstrip('/').rsplit('/', 1)[-1]}/manifest.msgpack" for p in found}
        return found

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """Lightning's ``save_last="link"``; where links fail, a copy of the folder."""
        try:
            _LightningModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
        except IsADirectoryError:  # Lightning's fallback copies a file: copy the folder
            shutil.copytree(filepath, linkpath)
            trainer.strategy.barrier()

    @property
    def preempted(self) -> bool:
        """The last ``fit`` stopped at a preemption signal after saving its last checkpoint."""
        return self._preemption.done

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore a resumed run's RNG states: before ``fit`` builds the train iterator, whose
        order a resumed run draws there (a straight run, at the next epoch's start)."""
        if self._pending_rng is not None and trainer.world_size == 1:
            set_rng_state(self._pending_rng)
        self._pending_rng = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's timer start; watch for preemption signals (after the Trainer's)."""
        super().on_train_start(trainer, pl_module)
        self._preemption.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """Lightning's step and time save points, then a pending preemption save."""
        if not self.preempted:
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
            self._preemption.at_save_point(self, trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's epoch save point, then a pending preemption save."""
        if not self.preempted:
            super().on_train_epoch_end(trainer, pl_module)
            self._preemption.at_save_point(self, trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any, **__: Any) -> None:
        """A preemption notice waits for the end of validation (see ``_lightning_preempt``)."""
        self._preemption.hold(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's save point after validation, then a pending preemption save (which
        waits for the training epoch's end when the callback saves there)."""
        if self.preempted:
            return
        super().on_validation_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._preemption.hold(trainer)
        else:
            self._preemption.at_save_point(self, trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:  # fmt: skip
        """Lightning's ``save_on_exception``; stop watching for signals."""
        self._preemption.close()
        super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's final ``save_last`` (not after a preemption save, already the last)."""
        if not self.preempted:
            super().on_train_end(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stop watching for signals."""
        self._preemption.close()

    def state_dict(self) -> dict[str, Any]:
        """Lightning's keys, plus the RNG states with ``restore_rng``."""
        state: dict[str, Any] = super().state_dict()
        if self._restore_rng:
            state["rng"] = rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore; the RNG states are applied at ``on_fit_start``."""
        super().load_state_dict(state_dict)
        if self._restore_rng and state_dict.get("rng") is not None:
            self._pending_rng = state_dict["rng"]
