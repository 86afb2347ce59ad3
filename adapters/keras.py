"""Keras 3 adapter: drop-in ``ModelCheckpoint`` and ``BackupAndRestore`` on every backend
(only the import changes), ``to_state`` / ``load_state``, ``save`` / ``load``, ``local_copy``.

The callbacks translate Keras's hooks into :class:`checkpointer.CheckpointManager` calls;
the manager decides (Keras's ``save_freq`` aside), writes, commits, ranks, retains and
indexes. A ``filepath`` ending in ``.weights.h5``, ``.keras`` or ``.h5`` is exactly the file
Keras would write (the manager's payload writer: :mod:`checkpointer.payload`); any other
path (a folder, a ``.safetensors`` name) is a checkpoint in this project's format.
"""

from __future__ import annotations

from ._require import require

with require(__name__, "Keras 3 and a backend", "keras"):
    import keras

    if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"found Keras {keras.__version__}")

import logging
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

from checkpointer import CheckpointInfo, CheckpointManager
from checkpointer.errors import ConfigurationError
from checkpointer.monitor import Monitor, check_options, infer_mode, scalar_metrics
from checkpointer.payload import local_copy
from checkpointer.preemption import DEFAULT_SIGNALS, PreemptionSession
from checkpointer.retention import check_limit

from . import _keras_common as kc
from ._keras_backup import BackupAndRestore
from ._keras_state import global_step, load, load_state, save, to_state

__all__ = ["ModelCheckpoint", "BackupAndRestore", "to_state", "load_state", "save", "load",
           "local_copy"]

_log = logging.getLogger("checkpointer")


class ModelCheckpoint(keras.callbacks.Callback):
    """Drop-in for ``keras.callbacks.ModelCheckpoint``, saving through the manager.

    Positional arguments and defaults are Keras's. ``{epoch}`` (1-based), ``{batch}``
    (1-based) and any log key fill ``filepath``; an integer ``save_freq`` counts batches.
    Unlike Keras's callback: save-best works with an integer ``save_freq``; a NaN never
    becomes the best; a missing monitored metric warns and never overwrites the best; a
    resumed run (``initial_epoch > 0``, or a ``BackupAndRestore`` restore) keeps the best
    of the run it resumes, while a fresh run starts afresh, as Keras does.

    Args:
        filepath: ``.weights.h5`` / ``.keras`` / ``.h5``: Keras's own file; anything else
            (a folder, ``name.safetensors``, ``dir/epoch{epoch:02d}``): this project's
            format. Any fsspec URL; only the file name may hold ``{fields}``.
        monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
        initial_value_threshold: as in Keras.
        keep_best, keep_last, min_delta, nan_policy, async_save, storage_options: the
            manager's (:class:`checkpointer.CheckpointManager`); with ``async_save`` Keras
            writes its file on the training thread and the commit runs in the background.
        save_on_preemption, preemption_signals: on such a signal, save at the next batch end
            (or epoch end) whatever ``save_freq`` and ``save_best_only`` say, wait for the
            commit, then stop training (docs/keras.md). One process only.

    Raises:
        ConfigurationError: an invalid option (a ``ValueError``, as Keras raises), among them
            ``save_on_preemption`` with ``save_best_only`` and a ``filepath`` without fields.

    Example:
        >>> cb = ModelCheckpoint("best_model.weights.h5", save_weights_only=True,
        ...                      monitor="val_loss", mode="min", save_best_only=True)
        >>> model.fit(x, y, validation_data=(xv, yv), callbacks=[cb])
        >>> model.load_weights("best_model.weights.h5")
    """

    def __init__(  # Keras's arguments, then the extensions (keyword-only)
        self, filepath: str | os.PathLike[str], monitor: str = "val_loss", verbose: int = 0,
        save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
        save_freq: str | int = "epoch", initial_value_threshold: float | None = None, *,
        keep_best: int | None = None, keep_last: int | None = None, min_delta: float = 0.0,
        nan_policy: str = "worst", async_save: bool = False, save_on_preemption: bool = False,
        preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS,
        storage_options: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.filepath, self.monitor, self.verbose = os.fspath(filepath), monitor, verbose
        self.mode, self.save_freq = kc.check_mode(mode), kc.check_save_freq(save_freq)
        self.save_best_only, self.save_weights_only = bool(save_best_only), bool(save_weights_only)
        self.initial_value_threshold, self.min_delta, self.nan_policy = (
            initial_value_threshold, min_delta, nan_policy)  # fmt: skip
        self.keep_best, self.keep_last = keep_best, keep_last
        self.async_save, self.storage_options = bool(async_save), storage_options
        check_limit("keep_last", keep_last)
        check_limit("keep_best", keep_best)
        check_options(min_delta, initial_value_threshold, nan_policy)
        self.best: float | None = None
        self._ranked = self.save_best_only or bool(keep_best)
        self._keras_file = self.filepath.endswith(kc.KERAS_SUFFIXES)
        kc.check_weights_path(self.filepath, self._keras_file, self.save_weights_only)
        self._directory, self._filename, self._shown = kc.split_filepath(self.filepath, self._keras_file)
        self._monitor = self._resolve_monitor(None)
        self._counter = kc.BatchCounter(self.save_freq) if self.save_freq != "epoch" else None
        self._preemption = PreemptionSession(save_on_preemption, preemption_signals)
        kc.check_preemption_path(save_on_preemption, self.save_best_only,
                              self._filename or "{default}", self.filepath)  # fmt: skip
        self._current_epoch = self._last_batch = 0
        self._manager: CheckpointManager | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._preemption.start()
        if self._monitor is None:
            self._monitor = self._resolve_monitor(self.model)
        if self._monitor is None and self._ranked:
            raise ConfigurationError(
                f"ModelCheckpoint callback received monitor={self.monitor}, but cannot tell whether "
                "that metric should be maximized or minimized. Pass `mode='max'` or `mode='min'`.")

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch
        self._open(epoch)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._last_batch = batch
        scheduled = self._counter is not None and self._counter.due(batch)
        self._save_point(self._current_epoch, batch, logs, scheduled)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        by_epoch = self.save_freq == "epoch"  # else a preemption save here names the last batch
        self._save_point(epoch, None if by_epoch else self._last_batch, logs, by_epoch)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._preemption.close()
        if self._manager is not None:
            self._manager.wait()  # a background save's error is raised here
            self._sync_best()

    @property
    def preempted(self) -> bool:
        """The last ``fit`` stopped at a preemption signal after saving at that point."""
        return self._preemption.done

    def _resolve_monitor(self, model: Any) -> Monitor | None:
        mode = self.mode if self.mode != "auto" else infer_mode(self.monitor) or (
            None if model is None else kc.direction_from_model(model, self.monitor))  # fmt: skip
        if mode is None:
            return None
        return Monitor.create(self.monitor, mode, self.min_delta, self.initial_value_threshold,
                              self.nan_policy)  # fmt: skip

    def _open(self, epoch: int) -> CheckpointManager:
        """The manager, opened at the first save point of the first ``fit`` (every
        ``on_train_begin`` has run: a ``BackupAndRestore`` restore is known by then)."""
        if self._manager is not None:
            return self._manager
        ranking = self._monitor if self._ranked else None
        resumed = epoch > 0 or id(self.model) in kc.RESUMED
        self._manager = manager = CheckpointManager(
            self._directory, monitor=None if ranking is None else ranking.metric,
            mode="auto" if ranking is None else ranking.mode, min_delta=self.min_delta,
            initial_value_threshold=self.initial_value_threshold,
            save_best_only=self.save_best_only, keep_last=self.keep_last, keep_best=self.keep_best,
            filename=self._filename, nan_policy=self.nan_policy, async_save=self.async_save,
            storage_options=self.storage_options, rank_existing=resumed,
            payload=self._write if self._keras_file else None)  # fmt: skip
        self._sync_best()  # resumed: the run goes on with its best
        earlier = [] if ranking is None or resumed else [
            v for c in manager.checkpoints if (v := ranking.finite_value(c.metrics)) is not None]
        if ranking is not None and earlier:
            _log.info("%s: this run does not resume (initial_epoch=0, no BackupAndRestore "
                      "restore): the earlier run's record (best %s=%s) is replaced by this run's",
                      self.filepath, ranking.metric, min(earlier, key=ranking.sort_key))  # fmt: skip
        return manager

    def _write(self, model: Any, path: str) -> None:
        """The payload writer: exactly the file Keras's callback would write."""
        if self.save_weights_only:
            model.save_weights(path, overwrite=True)
        else:
            model.save(path, overwrite=True)

    def _save_point(self, epoch: int, batch: int | None, logs: dict[str, Any] | None,
                    scheduled: bool) -> None:  # fmt: skip
        """A scheduled save, or (a preemption notice pending) a forced one, then the stop."""
        if self._preemption.done:
            return  # stopped: the preemption save is the last one of this fit
        forced = self._preemption.due() is not None
        if not (scheduled or forced):
            return
        manager = self._open(epoch)
        metrics: dict[str, Any] = scalar_metrics(logs or {})
        if batch is not None and "batch" not in metrics:
            metrics["batch"] = batch + 1
        step = global_step(self.model)
        state = self.model if self._keras_file else partial(self._state, epoch + 1, step)
        previous = self.best
        info: CheckpointInfo | None
        if forced:  # whatever the schedule and save_best_only say; committed before the stop
            info = manager.save(state, step=step, epoch=epoch + 1, metrics=metrics)
            manager.wait()
        else:
            info = manager.epoch_end(epoch + 1, state, step=step, metrics=metrics)
        self._note(info, metrics, previous, epoch + 1, forced)
        if forced:  # committed: stop training after this batch
            self.model.stop_training = True
            self._preemption.finish(None if info is None else info.url)

    def _sync_best(self) -> None:
        """Keras's ``best`` attribute: the manager's best (its last committed, so with
        ``async_save`` one save behind until ``on_train_end``)."""
        best = None if self._manager is None or not self._ranked else self._manager.best
        if best is not None and self._monitor is not None:
            self.best = self._monitor.finite_value(best.metrics)

    def _note(self, info: CheckpointInfo | None, metrics: dict[str, Any], previous: float | None,
              epoch: int, forced: bool) -> None:  # fmt: skip
        """Keras's ``best`` attribute and messages, from what the manager decided."""
        value = self._monitor.finite_value(metrics) if self._ranked and self._monitor else None
        if info is not None and value is not None and self.save_best_only and not forced:
            self.best = value  # saved under save_best_only: the manager found it an improvement
        elif info is not None:
            self._sync_best()
        path = None if info is None else self._shown + info.name
        if path is not None or self.save_best_only:
            kc.print_save(self.verbose, epoch, self.monitor, previous, value, path, self.save_best_only)
        if path is not None and self.verbose > 0:
            kc.print_msg(f"\nEpoch {epoch}: finished saving model to {path}")

    def _state(self, epoch: int, step: int) -> dict[str, Any]:
        state = to_state(self.model, include_optimizer=not self.save_weights_only)
        if not self.save_weights_only:
            state["epoch"], state["step"] = epoch, step
        return state

