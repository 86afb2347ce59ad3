"""Keras 3 adapter: drop-in ``ModelCheckpoint`` and ``BackupAndRestore`` backed by the core.

Both callbacks take Keras's own arguments and work on every Keras 3 backend (TensorFlow, JAX,
PyTorch); only the import changes::

    from checkpointer.adapters.keras import ModelCheckpoint   # was: from keras.callbacks ...

A ``filepath`` ending in ``.weights.h5``, ``.keras`` or ``.h5`` gets exactly the file Keras
would write, committed atomically on any fsspec store; any other path (a folder, or a
``.safetensors`` name) is a checkpoint in this project's format written by
:class:`checkpointer.CheckpointManager`. ``to_state`` / ``load_state`` convert a model for
plain use with ``checkpointer.save`` / ``checkpointer.load``; ``save(url, model)`` /
``load(url, model)`` are the one-liners.
"""

from __future__ import annotations

from ._require import require

with require(__name__, "Keras 3 and a backend", "keras"):
    import keras

    if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"found Keras {keras.__version__}")

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from checkpointer import CheckpointInfo, CheckpointManager, CheckpointWarning
from checkpointer.errors import ConfigurationError, MetricError
from checkpointer.monitor import Monitor, Score, check_options, infer_mode
from checkpointer.preemption import DEFAULT_SIGNALS
from checkpointer.retention import check_limit

from . import _keras_files as files
from ._keras_backup import BackupAndRestore
from ._keras_common import (
    BatchCounter,
    PreemptionStop,
    check_mode,
    check_preemption_path,
    check_save_freq,
    check_weights_path,
    direction_from_model,
    print_msg,
    print_save,
    scalar_logs,
    split_managed,
)
from ._keras_record import RECORD_SUFFIX, FileEntry, FileRecord
from ._keras_state import load, load_state, save, to_state

__all__ = ["ModelCheckpoint", "BackupAndRestore", "to_state", "load_state", "save", "load"]

_log = logging.getLogger("checkpointer")


class ModelCheckpoint(keras.callbacks.Callback):
    """Drop-in for ``keras.callbacks.ModelCheckpoint``, with a reliable best and extensions.

    Positional arguments and defaults are Keras's. ``{epoch}`` (1-based), ``{batch}``
    (1-based) and any log key fill ``filepath``; an integer ``save_freq`` counts batches.
    Unlike Keras's callback: save-best works with an integer ``save_freq``; a NaN never
    becomes the best; a missing monitored metric warns and never overwrites the best; the best
    survives a restarted run (a ``<file>.ckpt-best.json`` record beside Keras files, the
    manager's index for this project's format).

    Args:
        filepath: ``.weights.h5`` / ``.keras`` / ``.h5``: Keras's own file; anything else
            (a folder, ``name.safetensors``, ``dir/epoch{epoch:02d}``): this project's
            format. Any fsspec URL.
        monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
        initial_value_threshold: as in Keras.
        keep_best: keep the best K checkpoints (by ``monitor``) of those written.
        keep_last: keep the last N checkpoints written.
        min_delta: an improvement must beat the best by more than this.
        nan_policy: a NaN/inf monitored value: ``"worst"`` (never the best), ``"skip"``
            (no save) or ``"raise"``.
        async_save: write in a background thread (one save in flight).
        save_on_preemption: on a signal in ``preemption_signals``, save at the next batch end
            (or epoch end) whatever ``save_freq`` and ``save_best_only`` say, wait until the
            file has committed (also with ``async_save``), then stop training. That save is
            this callback's normal save at that point (``{epoch}``/``{batch}`` filled with
            it, ranked and retained as usual): a model file, not a training state to resume
            from; ``BackupAndRestore(save_on_preemption=True)`` is for resuming. The handlers
            are installed from ``on_train_begin`` to ``on_train_end`` (main thread; the
            handlers they replace still run). One process only.
        preemption_signals: signal names or numbers (default SIGTERM and SIGUSR1).
        storage_options: passed to fsspec.

    Raises:
        ConfigurationError: an invalid option (a ``ValueError``, as Keras raises), among them
            ``save_on_preemption`` with ``save_best_only`` and a ``filepath`` without fields
            (the preemption save would replace the best model).

    Example:
        >>> cb = ModelCheckpoint("best_model.weights.h5", save_weights_only=True,
        ...                      monitor="val_loss", mode="min", save_best_only=True)
        >>> model.fit(x, y, validation_data=(xv, yv), callbacks=[cb])
        >>> model.load_weights("best_model.weights.h5")
    """

    def __init__(
        self,
        filepath: str | os.PathLike[str],
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        keep_best: int | None = None,
        keep_last: int | None = None,
        min_delta: float = 0.0,
        nan_policy: str = "worst",
        async_save: bool = False,
        save_on_preemption: bool = False,
        preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        mode = check_mode(mode)
        self.filepath = os.fspath(filepath)
        self.monitor = monitor
        self.verbose = verbose
        self.mode = mode
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = check_save_freq(save_freq)
        self.initial_value_threshold = initial_value_threshold
        self.min_delta = min_delta
        self.nan_policy = nan_policy
        self.keep_best = keep_best
        self.keep_last = keep_last
        self.async_save = bool(async_save)
        self.storage_options = storage_options
        check_limit("keep_last", keep_last)
        check_limit("keep_best", keep_best)
        check_options(min_delta, initial_value_threshold, nan_policy)
        self.best: float | None = None
        self._ranked = self.save_best_only or bool(keep_best)
        self._monitor = self._resolve_monitor(None)
        self._keras_file = files.is_keras_file(self.filepath)
        check_weights_path(self.filepath, self._keras_file, self.save_weights_only)
        if not self._keras_file:
            self._directory, self._filename = split_managed(self.filepath)
        self._counter = BatchCounter(self.save_freq) if self.save_freq != "epoch" else None
        self._preemption = PreemptionStop(save_on_preemption, preemption_signals)
        named = self.filepath if self._keras_file else (self._filename or "{default}")
        check_preemption_path(save_on_preemption, self.save_best_only, named, self.filepath)
        self._current_epoch = self._last_batch = 0
        self._record: FileRecord | None = None
        self._manager: CheckpointManager | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    # -- Keras hooks -----------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._wait_pending()
        self._preemption.start()
        if self._monitor is None:
            self._monitor = self._resolve_monitor(self.model)
        if self._monitor is None and self._ranked:
            raise ConfigurationError(
                f"ModelCheckpoint callback received monitor={self.monitor}, but cannot tell "
                "whether that metric should be maximized or minimized. Pass `mode='max'` or "
                "`mode='min'`."
            )
        ranking = self._monitor if self._ranked else None
        if self._keras_file:
            for name in files.cleanup_leftovers(self.filepath, RECORD_SUFFIX, self.storage_options):
                _log.info("removed %s, left unfinished by a writer that is gone", name)
            if self._ranked or self.keep_last:
                if self._record is None:
                    self._record = FileRecord(self.filepath, ranking, self.storage_options)
                if self._record.load() and self._record.best is not None:
                    self.best = self._record.best.value
        elif self._manager is None:
            self._manager = CheckpointManager(
                self._directory,
                monitor=None if ranking is None else ranking.metric,
                mode="auto" if ranking is None else ranking.mode,
                min_delta=self.min_delta,
                initial_value_threshold=self.initial_value_threshold,
                save_best_only=self.save_best_only,
                every_n_epochs=1,
                keep_last=self.keep_last,
                keep_best=self.keep_best,
                filename=self._filename,
                nan_policy=self.nan_policy,
                async_save=self.async_save,
                storage_options=self.storage_options,
            )
            best = self._manager.best
            if best is not None and ranking is not None:
                self.best = ranking.extract(best.metrics)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._last_batch = batch
        scheduled = self._counter is not None and self._counter.due(batch)
        self._save_point(self._current_epoch, batch, logs, scheduled)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        by_epoch = self.save_freq == "epoch"  # else a preemption save here names the last batch
        self._save_point(epoch, None if by_epoch else self._last_batch, logs, by_epoch)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._preemption.close()
        self._wait_pending()
        if self._manager is not None:
            self._manager.wait()

    @property
    def preempted(self) -> bool:
        """The last ``fit`` stopped at a preemption signal after saving at that point."""
        return self._preemption.done

    # -- decisions --------------------------------------------------------------------

    def _resolve_monitor(self, model: Any) -> Monitor | None:
        mode = self.mode
        if mode == "auto":
            mode = infer_mode(self.monitor) or (
                direction_from_model(model, self.monitor) if model is not None else None
            )
        if mode is None:
            return None
        return Monitor.create(
            self.monitor, mode, self.min_delta, self.initial_value_threshold, self.nan_policy
        )

    def _get_file_path(self, epoch: int, batch: int | None, logs: Mapping[str, Any]) -> str:
        """Keras's rule: ``epoch`` and ``batch`` 1-based, every log key available."""
        try:
            if batch is None or "batch" in logs:
                return self.filepath.format(epoch=epoch + 1, **logs)
            return self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}'
            ) from e

    def _score(self, logs: Mapping[str, Any]) -> Score | None:
        """The monitored value judged by the core when ranking is on; warns when missing.

        Raises:
            MetricError: a NaN/inf value under ``nan_policy="raise"``.
        """
        if not self._ranked or self._monitor is None:
            return None
        score = self._monitor.score(scalar_logs(logs))  # non-numbers are not in scalar_logs
        if score.missing:
            warnings.warn(
                f"Can save best model only with {self.monitor} available: {self.monitor!r} is "
                f"not in the logs ({sorted(logs)}); this save point is not ranked and the best "
                "is not overwritten.",
                CheckpointWarning,
                stacklevel=3,
            )
        return score

    def _save_point(
        self, epoch: int, batch: int | None, logs: Mapping[str, Any] | None, scheduled: bool
    ) -> None:
        """A scheduled save, or (a preemption notice pending) a forced one, then the stop."""
        if self._preemption.done:
            return  # stopped: the preemption save is the last one of this fit
        forced = self._preemption.due() is not None
        if not (scheduled or forced):
            return
        self._wait_pending()
        logs = dict(logs or {})
        if self._keras_file:
            url = self._save_file(epoch, batch, logs, forced)
        else:
            url = self._save_managed(epoch, batch, logs, forced)
        if forced:
            self._wait_pending()  # an async_save commit has landed before training stops
            self._preemption.stopped(self.model, url)

    def _save_file(
        self, epoch: int, batch: int | None, logs: dict[str, Any], forced: bool = False
    ) -> str | None:
        filepath = self._get_file_path(epoch, batch, logs)
        score = self._score(logs)
        if score is not None and score.skip and not forced:
            _log.info("not saving %s: %s", filepath, score.skip)
            return None
        value = None if score is None else score.value
        is_best = False
        if self.save_best_only:
            assert self._monitor is not None
            is_best = value is not None and self._monitor.is_improvement(value, self.best)
            if not is_best and not forced:
                print_save(self.verbose, epoch + 1, self.monitor, self.best, value, None, True)
                return None
        print_save(
            self.verbose, epoch + 1, self.monitor, self.best, value, filepath, self.save_best_only
        )
        staged = files.stage_model_file(
            self.model,
            filepath,
            weights_only=self.save_weights_only,
            storage_options=self.storage_options,
        )
        entry = FileEntry(filepath, value, epoch + 1, None if batch is None else batch + 1)
        previous = self.best
        if is_best:
            self.best = value  # decisions until the commit lands see the new best

        def commit() -> None:
            try:
                staged.commit()
            except BaseException:
                if is_best:
                    self.best = previous  # the file on storage is still the previous best
                raise
            if self._record is not None:
                self._record.add(entry, is_best=is_best)
                for gone in self._record.apply_retention(self.keep_last, self.keep_best):
                    _log.info("deleted %s (outside keep_last=%s / keep_best=%s)", gone,
                              self.keep_last, self.keep_best)  # fmt: skip
                self._record.save()
            if self.verbose > 0:
                print_msg(f"\nEpoch {epoch + 1}: finished saving model to {filepath}")

        self._run(commit)
        return filepath

    def _save_managed(
        self, epoch: int, batch: int | None, logs: dict[str, Any], forced: bool = False
    ) -> str | None:
        assert self._manager is not None, "on_train_begin was not called"
        metrics = scalar_logs(logs)
        if batch is not None and "batch" not in metrics and "batch" in (self._filename or ""):
            metrics["batch"] = batch + 1
        step = self._global_step()
        previous = self.best
        state = partial(self._state, epoch + 1, step)
        info: CheckpointInfo | None
        if forced:  # whatever the schedule and save_best_only say; committed before the stop
            info = self._manager.save(state, step=step, epoch=epoch + 1, metrics=metrics)
            self._manager.wait()
        else:
            info = self._manager.epoch_end(epoch + 1, state, step=step, metrics=metrics)
        score = Score(None)
        if self._ranked and self._monitor is not None:
            try:
                score = self._monitor.score(metrics)
            except MetricError:  # the manager judged it already (and raised under "raise")
                score = Score(None)
        value, monitor = score.value, self._monitor
        if (
            info is not None
            and monitor is not None
            and score.finite
            and ((self.save_best_only and not forced) or monitor.better(value, previous))
        ):
            self.best = value
        url = None if info is None else info.url
        print_save(self.verbose, epoch + 1, self.monitor, previous, value, url, self.save_best_only)
        return url

    def _state(self, epoch: int, step: int) -> dict[str, Any]:
        state = to_state(self.model, include_optimizer=not self.save_weights_only)
        if not self.save_weights_only:
            state["epoch"], state["step"] = epoch, step
        return state

    def _global_step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return 0
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    # -- background commits -------------------------------------------------------------

    def _run(self, job: Callable[[], None]) -> None:
        if not self.async_save:
            job()
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpointer-keras")
        self._pending = self._executor.submit(job)

    def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises a background failure here, never lost
