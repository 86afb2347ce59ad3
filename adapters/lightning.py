"""Lightning integration: a ``ModelCheckpoint`` callback and a ``SafeCheckpointIO`` plugin.

The callback only translates Lightning's hooks into core calls. At each hook it asks the
core :class:`~checkpointer.schedule.Schedule` whether this is a save point (counting epochs
as Lightning does, ``current_epoch + 1``), asks the core :class:`~checkpointer.monitor.Monitor`
whether the score enters the top k, then hands the trainer's checkpoint dict to a
:class:`~checkpointer.CheckpointManager`, which names, writes, ranks and retains
(``save_top_k`` -> ``keep_best``). ``best_model_path``, ``best_k_models`` and friends are
read back from the manager, so storage is the single source of truth, also after a resume.
Under DDP only rank 0 writes; the decisions and the resulting attributes are broadcast.

Deviations from Lightning's ``ModelCheckpoint`` are listed in docs/torch.md, section
"Deviations from Lightning's ``ModelCheckpoint``".

A ``LightningModule`` is an ``nn.Module``: the plain verbs ``to_state`` / ``load_state`` /
``save`` / ``load`` of :mod:`checkpointer.adapters.torch` apply to it as they are, and are
re-exported here (``from checkpointer.adapters.lightning import to_state``).
"""

from __future__ import annotations

from ._require import require

with require(__name__, "Lightning", "lightning"):
    import lightning.pytorch as pl
    from lightning.fabric.plugins import TorchCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal
from weakref import proxy

import torch

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.distributed import SingleProcess
from checkpointer.monitor import Monitor
from checkpointer.naming import template_fields
from checkpointer.paths import join_url
from checkpointer.preemption import DEFAULT_SIGNALS
from checkpointer.schedule import Schedule

from ._lightning_preempt import LightningPreemption
from ._torch_lightning_io import SafeCheckpointIO, decode_checkpoint, encode_checkpoint
from ._torch_lightning_util import (
    Once,
    absolute_dirpath,
    apply_summary,
    check_options,
    find_last,
    last_name,
    lightning_template,
    ranked,
    resolve_dirpath,
    restore_attributes,
    scalar_metrics,
    step_schedule,
    summarize,
)
from .torch import load, load_state, rng_state, save, set_rng_state, to_state

__all__ = ["ModelCheckpoint", "SafeCheckpointIO", "encode_checkpoint", "decode_checkpoint",
           "to_state", "load_state", "save", "load"]  # fmt: skip

log = logging.getLogger("checkpointer")


# Subclassing Lightning's ModelCheckpoint (not just Checkpoint) only so that
# ``trainer.fit(ckpt_path="last")`` finds our last checkpoint: Lightning's connector asks
# ``isinstance(cb, ModelCheckpoint)`` before calling ``_find_last_checkpoints``. Its
# ``__init__`` and every hook that saves are replaced; its small hook-state helpers
# (``_should_skip_saving_checkpoint``, ``_should_save_on_train_epoch_end``,
# ``_monitor_candidates``) and ``state_key`` are reused as they are.
class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, backed by :class:`checkpointer.CheckpointManager`.

    Takes Lightning's arguments with Lightning's meaning (deviations: docs/torch.md's
    "Deviations from Lightning's ``ModelCheckpoint``").
    Each checkpoint is a folder ``<dirpath>/<name>.ckpt/`` in this library's format
    (safetensors + msgpack, no pickle). ``setup`` installs :class:`SafeCheckpointIO` on the
    trainer when it still uses Lightning's default ``TorchCheckpointIO``, so that
    ``trainer.fit(ckpt_path=...)`` (``"last"``, ``"best"`` or a path) can read them.

    Extra keyword-only arguments: ``async_save`` and ``storage_options`` (passed to the
    core), ``clock`` (seconds, for ``train_time_interval``; injectable for tests) and
    ``restore_rng`` (save Python/numpy/torch RNG states and restore them on resume, for
    bit-exact resumption; single-process runs only).

    ``save_on_preemption=True`` (``preemption_signals``: SIGTERM, SIGUSR1): on a signal, the
    next save point writes the full state as the last checkpoint and stops training, so that
    ``trainer.fit(ckpt_path="last")`` resumes from there (see :mod:`._lightning_preempt`).

    Example::

        ckpt = ModelCheckpoint(dirpath="ckpts", monitor="val_loss", save_top_k=2, save_last=True)
        trainer = Trainer(callbacks=[ckpt], plugins=[SafeCheckpointIO()])
        trainer.fit(model, ckpt_path="last")
        print(ckpt.best_model_path, ckpt.best_model_score)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        *,
        async_save: bool = False,
        storage_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        restore_rng: bool = True,
        save_on_preemption: bool = False,
        preemption_signals: Sequence[str | int] = DEFAULT_SIGNALS,
    ) -> None:
        # Lightning's ModelCheckpoint.__init__ is skipped on purpose (see the note above).
        options = (save_top_k, monitor, mode, save_last)
        check_options(*options, every_n_train_steps, every_n_epochs, train_time_interval)
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_epochs = 1
        self.monitor, self.mode, self.verbose = monitor, mode, verbose
        self.save_last, self.save_top_k = save_last, save_top_k
        self.save_weights_only, self.save_on_exception = save_weights_only, False
        self._enable_version_counter = False  # read by inherited Lightning helpers
        self.auto_insert_metric_name, self.filename = auto_insert_metric_name, filename
        self._every_n_train_steps = every_n_train_steps or 0
        self._every_n_epochs = every_n_epochs or 0
        self._train_time_interval = train_time_interval
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._dirpath_arg = absolute_dirpath(dirpath)
        self.dirpath: str | None = self._dirpath_arg
        self._template = lightning_template(filename, auto_insert_metric_name)
        template_fields(self._template)  # a bad template fails here, not at the first save
        self._monitor = None if monitor is None else Monitor.create(monitor, mode)
        self._epochs = Schedule(self._every_n_epochs or None, None, None)
        self._steps = step_schedule(self._every_n_train_steps, train_time_interval)
        self._async_save, self._storage_options = async_save, storage_options
        self._clock, self._restore_rng = clock, restore_rng
        self._preemption = LightningPreemption(save_on_preemption, preemption_signals)
        self._mgr: CheckpointManager | None = None
        self._mgr_dir: str | None = None
        self._last_time: float | None = None
        self._last_global_step_saved, self._last_checkpoint_saved, self._deferred = 0, "", False
        self._pending_rng: Any = None
        self._newest_path = ""
        self.current_score: torch.Tensor | None = None
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)
        self.best_model_score: torch.Tensor | None = None
        self.best_model_path = ""
        self.last_model_path = ""

    # -- where ------------------------------------------------------------------------

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """Our last checkpoint folder(s), for ``trainer.fit(ckpt_path="last")``."""
        dirpath = self.dirpath or resolve_dirpath(trainer, self._dirpath_arg)
        return find_last(dirpath, self.CHECKPOINT_NAME_LAST, self._storage_options)

    # -- hooks ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve ``dirpath`` (rank 0's), open the manager on rank 0, install the IO plugin."""
        self.dirpath = trainer.strategy.broadcast(resolve_dirpath(trainer, self._dirpath_arg))
        if trainer.is_global_zero and (self._mgr is None or self._mgr_dir != self.dirpath):
            self._mgr = CheckpointManager(
                self.dirpath,
                monitor=self.monitor,
                mode=self.mode,
                every_n_epochs=None,
                keep_best=self.save_top_k if self._monitor and self.save_top_k > 0 else None,
                keep_last=1 if self._monitor is None and self.save_top_k == 1 else None,
                filename=self._template + self.FILE_EXTENSION,
                async_save=self._async_save,
                storage_options=self._storage_options,
                coordinator=SingleProcess(),  # this callback does its own rank agreement
            )
            self._mgr_dir = self.dirpath
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO(storage_options=self._storage_options)
            log.info("ModelCheckpoint installed SafeCheckpointIO on the trainer (no pickle)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply a restored RNG state (before the train loader draws its order); re-read the
        top k from storage, which is the truth also after a resume."""
        if self._pending_rng is not None:
            if trainer.world_size == 1:
                set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._sync(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock of ``train_time_interval``; watch for preemption signals (after
        the Trainer has installed its own handlers)."""
        self._last_time = self._clock()
        self._preemption.start()

    @property
    def preempted(self) -> bool:
        """The last ``fit`` stopped at a preemption signal after saving its last checkpoint."""
        return self._preemption.done

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        """``every_n_train_steps`` and ``train_time_interval`` save points."""
        skip = self._should_skip_saving_checkpoint(trainer)
        self._point(trainer, not skip and self._step_due(trainer))

    def _step_due(self, trainer: pl.Trainer) -> bool:
        now = self._clock()
        reason = self._steps.at_step(trainer.global_step, since=self._last_time, now=now)
        reason = trainer.strategy.broadcast(reason)  # clocks differ across ranks: rank 0 decides
        if reason is None:
            return False
        if self._train_time_interval is not None:
            self._last_time = now
        if self.monitor is not None and self.monitor not in trainer.callback_metrics:
            self._deferred = True  # a validation metric: save once validation has produced it
            return False
        return True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch save point when saving at the end of the training epoch."""
        at_end = self._should_save_on_train_epoch_end(trainer)
        self._point(trainer, at_end and not self._should_skip_saving_checkpoint(trainer)
                    and self._epoch_due(trainer))  # fmt: skip

    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        """A preemption notice waits for the end of validation (see ``_lightning_preempt``)."""
        self._preemption.hold(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch save point after validation, and deferred step/time save points."""
        if self._should_save_on_train_epoch_end(trainer):
            self._preemption.hold(trainer)  # a notice waits for the epoch's save point, next
            return
        due = not self._should_skip_saving_checkpoint(trainer)
        if due and self._deferred:
            self._deferred = False
        elif due:
            due = self._epoch_due(trainer)
        self._point(trainer, due)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """No save on exception (Lightning's ``save_on_exception`` is not supported)."""
        self._preemption.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``save_last``, make sure a last checkpoint exists; wait for async saves."""
        if self.save_last and not self._last_checkpoint_saved and not self.preempted:
            self._save_point(trainer, top_k=False)
        if self._mgr is not None:
            self._mgr.wait()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Wait for an in-flight asynchronous save; stop watching for signals."""
        self._preemption.close()
        if self._mgr is not None:
            self._mgr.wait()

    # -- saving --------------------------------------------------------------------------

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return self._epochs.at_epoch(trainer.current_epoch + 1, since=None, now=0.0) is not None

    def _point(self, trainer: pl.Trainer, due: bool) -> None:
        """A save point: the scheduled save when ``due``; a preemption notice (any rank's)
        adds the full last checkpoint, committed before training is told to stop."""
        if self.preempted:
            return  # stopped: the preemption save is this fit's last
        preempt = self._preemption.agreed(trainer)
        if due or preempt:
            self._save_point(trainer, top_k=due, preempt=preempt)
        if preempt:
            self._preemption.stopped(trainer, self.last_model_path)

    def _save_point(self, trainer: pl.Trainer, top_k: bool = True, preempt: bool = False) -> None:
        metrics = scalar_metrics(self._monitor_candidates(trainer))
        # As Lightning, a metric the filename names but nobody logged formats as 0.
        named = {**{f: 0.0 for f in template_fields(self._template)}, **metrics}
        dump = trainer._checkpoint_connector.dump_checkpoint
        state = Once(lambda: encode_checkpoint(dump(self.save_weights_only)))
        full = Once(lambda: encode_checkpoint(dump(False))) if self.save_weights_only else state
        summary = None
        if trainer.is_global_zero:
            wrote = self._save_top_k(trainer, metrics, named, state) if top_k else False
            if preempt and self._mgr is not None:
                self._mgr.wait()  # an async top-k save has committed before training stops
            if self.save_last or preempt:
                self._save_last(named, full if preempt else state)
            summary = self._summary(metrics.get(self.monitor) if self.monitor else None)
            if wrote:
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
        apply_summary(self, trainer.strategy.broadcast(summary))
        self._last_global_step_saved = trainer.global_step

    def _save_top_k(
        self, trainer: pl.Trainer, metrics: dict[str, float], named: dict[str, float], state: Once
    ) -> bool:
        assert self._mgr is not None
        if self.save_top_k == 0:
            return False
        step, epoch = trainer.global_step, trainer.current_epoch
        if self._monitor is not None:
            value = metrics.get(self._monitor.metric)
            if value is None:
                log.warning(
                    "ModelCheckpoint: no %r among %s; not saved", self.monitor, sorted(metrics)
                )
                return False
            top = ranked(self._mgr.checkpoints, self._monitor)
            k = self.save_top_k
            if k > 0 and len(top) >= k and not self._monitor.better(value, top[k - 1][1]):
                if self.verbose:
                    log.info("step %d: %s=%s is not in the top %d", step, self.monitor, value, k)
                return False
        info = self._mgr.save(state, step=step, epoch=epoch, metrics=named)
        self._newest_path = info.url
        if self.verbose:
            log.info("epoch %d, step %d: saved %s", epoch, step, info.url)
        return True

    def _save_last(self, metrics: dict[str, float], state: Once) -> None:
        assert self.dirpath is not None
        name = last_name(self.CHECKPOINT_NAME_LAST, self.FILE_EXTENSION, metrics)
        url = join_url(self.dirpath, name)
        checkpointer.save(
            url,
            state,
            metadata={"writer": "checkpointer.adapters.lightning", "last": True},
            storage_options=self._storage_options,
        )
        if self.last_model_path and self.last_model_path != url:
            SafeCheckpointIO(storage_options=self._storage_options).remove_checkpoint(
                self.last_model_path
            )
        self.last_model_path = self._last_checkpoint_saved = url

    def _summary(self, current: float | None) -> dict[str, Any]:
        assert self._mgr is not None
        return summarize(
            self._mgr.checkpoints,
            self._monitor,
            self.save_top_k,
            current,
            self._newest_path,
            self.last_model_path,
            self._last_checkpoint_saved,
        )

    def _sync(self, trainer: pl.Trainer) -> None:
        summary = self._summary(None) if trainer.is_global_zero and self._mgr is not None else None
        apply_summary(self, trainer.strategy.broadcast(summary))

    # -- resumable state -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Lightning's keys (best/kth/last paths and scores) plus the RNG states."""
        state = {
            "monitor": self.monitor,
            "best_model_score": self.best_model_score,
            "best_model_path": self.best_model_path,
            "current_score": self.current_score,
            "dirpath": self.dirpath,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }
        if self._restore_rng:
            state["rng"] = rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the attributes (as Lightning does); storage is re-read at fit start."""
        restore_attributes(self, state_dict)
        if self._restore_rng and state_dict.get("rng") is not None:
            self._pending_rng = state_dict["rng"]
