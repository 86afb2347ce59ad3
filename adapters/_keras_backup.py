"""``BackupAndRestore``: Keras's fault-tolerance callback, stored in this project's format.

Mirrors ``keras.callbacks.BackupAndRestore``: a backup (weights, optimizer variables, the
epoch to resume at and the batches already done in it) is written at the end of each epoch or
every ``save_freq`` batches; ``on_train_begin`` restores the newest backup and sets
``model._initial_epoch`` so that ``fit`` resumes at the right epoch; a successful ``fit``
deletes the backups. Keras 3's trainer cannot start mid-epoch, so a backup taken after batch
``k`` is resumed by running the first ``k`` batches of that epoch and restoring the backed-up
state after each of them: the weights continue exactly where they were (with the same data
order, e.g. ``shuffle=False``).

With ``save_on_preemption=True`` a preemption signal (SIGTERM, SIGUSR1 by default) makes
the next batch end (or epoch end) write a backup of exactly that point, whatever
``save_freq`` says; training then stops (``model.stop_training``), ``fit`` returns normally,
and the backups are kept: the next run resumes mid-epoch from that batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import fsspec
import keras

from checkpointer import CheckpointInfo, CheckpointManager
from checkpointer.errors import ConfigurationError
from checkpointer.preemption import DEFAULT_SIGNALS

from ._keras_common import BatchCounter, PreemptionStop, check_save_freq
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
        delete_checkpoint: delete ``backup_dir`` when ``fit`` completes (not after a
            preemption stop, whose backup the next run resumes from).
        save_on_preemption: on a signal in ``preemption_signals``, back up at the next batch
            end (or epoch end) and stop training (an extension; see the module docstring).
            The handlers are installed from ``on_train_begin`` to ``on_train_end``, on the
            main thread, and chain the handlers they replace. One process only.
        preemption_signals: signal names or numbers (default SIGTERM and SIGUSR1).
        storage_options: passed to fsspec (an extension).

    Raises:
        ConfigurationError: an empty ``backup_dir``, an invalid ``save_freq`` or preemption
            option (a ``ValueError``, as Keras raises); at ``fit``: an unbuilt model.

    Example:
        >>> cb = BackupAndRestore("s3://bucket/run1/backup", save_on_preemption=True)
        >>> model.fit(x, y, epochs=10, callbacks=[cb])   # rerun the same line after a crash
        >>> cb.preempted   # True: stopped by a signal; rerun to resume mid-epoch
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        save_on_preemption: bool = False,
        preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS,
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
        self._preemption = PreemptionStop(save_on_preemption, preemption_signals)
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
        self._preemption.start()
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
        if self._preemption.done:
            return
        self._batches_done = batch + 1
        saved = None
        if self._counter is not None and self._counter.due(batch):
            saved = self._save()
        self._stop_if_preempted(saved)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._preemption.done:
            return  # stopped mid-epoch: the backup holds that batch, not a finished epoch
        self._epoch, self._batches_done = epoch + 1, 0
        if self._counter is not None:
            self._counter.last = None
        saved = self._save() if self.save_freq == "epoch" else None
        self._stop_if_preempted(saved)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None  # a later fit() starts from its own initial_epoch
        self._preemption.close()
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        if self.delete_checkpoint and not self._preemption.done:
            fs, root = fsspec.core.url_to_fs(self.backup_dir, **(self.storage_options or {}))
            if fs.exists(root):
                fs.rm(root, recursive=True)

    @property
    def preempted(self) -> bool:
        """The last ``fit`` stopped at a preemption signal after backing up that batch."""
        return self._preemption.done

    def _stop_if_preempted(self, saved: CheckpointInfo | None) -> None:
        """A pending notice: back up here (unless ``saved`` just did), then stop training."""
        if self._preemption.due() is not None:
            info = saved or self._save()  # synchronous: committed when it returns
            self._preemption.stopped(self.model, info.url)

    def _save(self) -> CheckpointInfo:
        assert self._manager is not None, "on_train_begin was not called"
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        step = int(keras.ops.convert_to_numpy(optimizer.iterations)) if optimizer is not None else 0
        epoch, batches = self._epoch, self._batches_done

        def state() -> dict[str, Any]:
            tree = to_state(model)
            tree.update(epoch=epoch, batch=batches, step=step)
            return tree

        return self._manager.save(state, step=step, epoch=epoch)
