"""``BackupAndRestore``: Keras's fault-tolerance callback, through the manager.

A backup (weights, optimizer variables, the epoch to resume at and the batches already done
in it) is a checkpoint of this project's format, written at the end of each epoch or every
``save_freq`` batches; ``on_train_begin`` restores the newest and sets
``model._initial_epoch``; a successful ``fit`` deletes the backups. Keras 3's trainer cannot
start mid-epoch, so a backup taken after batch ``k`` is resumed by running the first ``k``
batches of that epoch and restoring the backed-up state after each: the weights continue
exactly where they were (with the same data order). With ``save_on_preemption=True`` a
signal makes the next batch (or epoch) end back up exactly that point and stop training;
the backups are kept, and the next run resumes there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import keras

from checkpointer import CheckpointInfo, CheckpointManager
from checkpointer.errors import ConfigurationError
from checkpointer.preemption import DEFAULT_SIGNALS, PreemptionSession
from checkpointer.storage import open_store

from ._keras_common import RESUMED, BatchCounter, check_save_freq
from ._keras_state import global_step, load_state, to_state

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
        save_on_preemption, preemption_signals: on such a signal, back up at the next batch
            (or epoch) end and stop training; installed from ``on_train_begin`` to
            ``on_train_end`` (main thread, chaining the handlers they replace). One process.
        storage_options: passed to fsspec.

    Raises:
        ConfigurationError: an empty ``backup_dir``, an invalid ``save_freq`` or preemption
            option (a ``ValueError``, as Keras raises); at ``fit``: an unbuilt model.

    Example:
        >>> cb = BackupAndRestore("s3://bucket/run1/backup", save_on_preemption=True)
        >>> model.fit(x, y, epochs=10, callbacks=[cb])   # rerun the same line after a crash
        >>> cb.preempted   # True: stopped by a signal; rerun to resume mid-epoch
    """

    def __init__(  # Keras's arguments, then the extensions (keyword-only)
        self, backup_dir: str | os.PathLike[str], save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False, delete_checkpoint: bool = True, *,
        save_on_preemption: bool = False, preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS,
        storage_options: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not backup_dir:
            raise ConfigurationError("Empty `backup_dir` argument passed")
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = check_save_freq(save_freq, backup=True)
        self.double_checkpoint, self.delete_checkpoint = bool(double_checkpoint), bool(delete_checkpoint)
        self.storage_options = storage_options
        self._preemption = PreemptionSession(save_on_preemption, preemption_signals)
        self._manager: CheckpointManager | None = None
        self._counter: BatchCounter | None = None
        self._current_epoch = 0  # the epoch a backup resumes at (Keras's name)
        self._batches_done = 0
        self._replay: tuple[dict[str, Any], int, int] | None = None  # (state, epoch, batches)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        if not model.built:
            raise ConfigurationError(
                "To use the BackupAndRestore callback, your model must be built before you call "
                f"`fit()`. Model {model} is unbuilt. You can build it beforehand by calling it "
                "on a batch of data.")
        freq = self.save_freq
        self._counter = BatchCounter(freq) if isinstance(freq, int) and freq is not False else None
        self._replay = None
        self._manager = CheckpointManager(self.backup_dir, every_n_epochs=None,
                                          keep_last=2 if self.double_checkpoint else 1,
                                          storage_options=self.storage_options)  # fmt: skip
        self._preemption.start()
        if self._manager.latest is None:
            return
        checkpoint = self._manager.restore("latest", fallback=self.double_checkpoint)
        state = checkpoint.state
        load_state(model, state)
        epoch, batches = int(state["epoch"]), int(state["batch"])
        model._initial_epoch = epoch
        RESUMED.add(id(model))  # a ModelCheckpoint of this fit keeps its earlier best
        _log.info("restored %s: resuming at epoch %d after batch %d", checkpoint.info.url, epoch + 1,
                  batches)  # fmt: skip
        if batches > 0:
            self._replay = (state, epoch, batches)
            if self._counter is not None:  # as if the counter had just fired at that batch
                self._counter.last, self._counter.seen = batches - 1, 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch, self._batches_done = epoch, 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._replay is not None:
            state, epoch, batches = self._replay
            if self._current_epoch == epoch and batch < batches:
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
        self._current_epoch, self._batches_done = epoch + 1, 0
        if self._counter is not None:
            self._counter.last = None
        saved = self._save() if self.save_freq == "epoch" else None
        self._stop_if_preempted(saved)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.model._initial_epoch = None  # a later fit() starts from its own initial_epoch
        RESUMED.discard(id(self.model))
        self._preemption.close()
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        if self.delete_checkpoint and not self._preemption.done:
            store = open_store(self.backup_dir, self.storage_options)
            if store.exists(""):
                store.remove_tree("")

    @property
    def preempted(self) -> bool:
        """The last ``fit`` stopped at a preemption signal after backing up that batch."""
        return self._preemption.done

    def _stop_if_preempted(self, saved: CheckpointInfo | None) -> None:
        """A pending notice: back up here (unless ``saved`` just did), then stop training."""
        if self._preemption.due() is not None:
            info = saved or self._save()  # synchronous: committed when it returns
            self.model.stop_training = True
            self._preemption.finish(info.url)

    def _save(self) -> CheckpointInfo:
        assert self._manager is not None, "on_train_begin was not called"
        model = self.model
        step = global_step(model)
        epoch, batches = self._current_epoch, self._batches_done

        def state() -> dict[str, Any]:
            tree = to_state(model)
            tree.update(epoch=epoch, batch=batches, step=step)
            return tree

        return self._manager.save(state, step=step, epoch=epoch)
