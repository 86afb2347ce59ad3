"""``BackupAndRestore``: Keras's fault-tolerance callback, stored in this project's format.

Mirrors ``keras.callbacks.BackupAndRestore``: a backup (weights, optimizer variables, the
epoch to resume at and the batches already done in it) is written at the end of each epoch or
every ``save_freq`` batches; ``on_train_begin`` restores the newest backup and sets
``model._initial_epoch`` so that ``fit`` resumes at the right epoch; a successful ``fit``
deletes the backups. Keras 3's trainer cannot start mid-epoch, so a backup taken after batch
``k`` is resumed by running the first ``k`` batches of that epoch and restoring the backed-up
state after each of them: the weights continue exactly where they were (with the same data
order, e.g. ``shuffle=False``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import fsspec
import keras

from checkpointer import CheckpointManager
from checkpointer.errors import ConfigurationError

from ._keras_common import BatchCounter, check_save_freq
from ._keras_state import load_state, to_state

__all__ = ["BackupAndRestore"]

_log = logging.getLogger("checkpointer")


class BackupAndRestore(keras.callbacks.Callback):
    """Drop-in for ``keras.callbacks.BackupAndRestore`` on any fsspec URL.

    Args:
        backup_dir: folder (local path or fsspec URL) for the backups; used by nothing else.
        save_freq: ``"epoch"``, a number of batches, or ``False`` (no scheduled backups).
        double_checkpoint: keep the previous backup too, and fall back to it when the newest
            fails verification.
        delete_checkpoint: delete ``backup_dir`` when ``fit`` completes.
        storage_options: passed to fsspec (an extension).

    Raises:
        ConfigurationError: an empty ``backup_dir`` or an invalid ``save_freq`` (a
            ``ValueError``, as Keras raises); at ``fit``: an unbuilt model.

    Example:
        >>> cb = BackupAndRestore("s3://bucket/run1/backup")
        >>> model.fit(x, y, epochs=10, callbacks=[cb])   # rerun the same line after a crash
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ConfigurationError("Empty `backup_dir` argument passed")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = check_save_freq(save_freq, allow_false=True)
        self.double_checkpoint, self.delete_checkpoint = (
            bool(double_checkpoint),
            bool(delete_checkpoint),
        )
        self.storage_options = storage_options
        self._manager: CheckpointManager | None = None
        self._counter: BatchCounter | None = None
        self._epoch = 0
        self._batches_done = 0
        self._replay: tuple[dict[str, Any], int, int] | None = None  # (state, epoch, batches)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        if not model.built:
            raise ConfigurationError(
                "To use the BackupAndRestore callback, your model must be built before you call "
                f"`fit()`. Model {model} is unbuilt. You can build it beforehand by calling it "
                "on a batch of data."
            )
        self._counter = (
            BatchCounter(self.save_freq)
            if isinstance(self.save_freq, int) and self.save_freq is not False
            else None
        )
        self._replay = None
        self._manager = CheckpointManager(
            self.backup_dir,
            every_n_epochs=None,
            keep_last=2 if self.double_checkpoint else 1,
            storage_options=self.storage_options,
        )
        if self._manager.latest is None:
            return
        checkpoint = self._manager.restore("latest", fallback=self.double_checkpoint)
        state = checkpoint.state
        load_state(model, state)
        epoch, batches = int(state["epoch"]), int(state["batch"])
        model._initial_epoch = epoch
        _log.info(
            "restored %s: resuming at epoch %d after batch %d",
            checkpoint.info.url,
            epoch + 1,
            batches,
        )
        if batches > 0:
            self._replay = (state, epoch, batches)
            if self._counter is not None:  # as if the counter had just fired at that batch
                self._counter.last, self._counter.seen = batches - 1, 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch, self._batches_done = epoch, 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._replay is not None:
            state, epoch, batches = self._replay
            if self._epoch == epoch and batch < batches:
                load_state(self.model, state)  # undo a batch the backup already contains
                self._batches_done = batch + 1
                if batch + 1 >= batches:
                    self._replay = None
                return
            self._replay = None
        self._batches_done = batch + 1
        if self._counter is not None and self._counter.due(batch):
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch, self._batches_done = epoch + 1, 0
        if self._counter is not None:
            self._counter.last = None
        if self.save_freq == "epoch":
            self._save()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None  # a later fit() starts from its own initial_epoch
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        if self.delete_checkpoint:
            fs, root = fsspec.core.url_to_fs(self.backup_dir, **(self.storage_options or {}))
            if fs.exists(root):
                fs.rm(root, recursive=True)

    def _save(self) -> None:
        assert self._manager is not None, "on_train_begin was not called"
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        step = int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0
        epoch, batches = self._epoch, self._batches_done

        def state() -> dict[str, Any]:
            tree = to_state(model)
            tree.update(epoch=epoch, batch=batches, step=step)
            return tree

        self._manager.save(state, step=step, epoch=epoch)
