"""``save_on_preemption`` of the Lightning ``ModelCheckpoint``: watch, agree, stop.

After a signal (``preemption_signals``: SIGTERM, SIGUSR1) the next save point (a training
batch end, the end of validation or of the training epoch) makes its scheduled saves, then
:meth:`LightningPreemption.at_save_point` writes the full state as the last checkpoint
(also without ``save_last`` or with ``save_weights_only``), waits for it, and stops training
(``trainer.should_stop``): ``fit`` returns, ``callback.preempted`` is True, and
``trainer.fit(ckpt_path="last")`` resumes there (mid-epoch with a resumable train loader).
Under DDP a notice on any rank stops every rank at the same point (:meth:`agreed`: one
all-reduce per save point).

The core's :class:`~checkpointer.preemption.PreemptionSession` installs its watch at
``on_train_start``, after the Trainer's own SIGTERM handler, so ours runs first; the
Trainer's teardown puts back the handlers it found, ours included. Lightning also raises
``SIGTERMException`` (a ``SystemExit``) after the batch or inside validation: once we take
a notice over (:meth:`hold`, :meth:`stopped`) we clear the Trainer's flag, so ``fit`` stops
at our save. A notice during validation waits for its end, or for the epoch-end save point
where the callback saves there. A SIGTERM Lightning sees before any of our hooks still ends
``fit`` with its exception, the last committed checkpoint kept. Under DDP send SIGTERM to
every rank, or another signal to any: Lightning 2.6's SIGTERM handler runs a collective,
which desynchronises ranks signalled alone.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from checkpointer.preemption import PreemptionSession

__all__ = ["LightningPreemption"]


class LightningPreemption(PreemptionSession):
    """One callback's preemption state across ``fit`` calls (the core's session) and what
    Lightning adds: the agreement across ranks, the save, and the Trainer's SIGTERM flag.

    Raises:
        ConfigurationError: ``enabled`` not a bool or a signal that cannot be caught (at
            construction); :meth:`start` outside the main thread.
    """

    def agreed(self, trainer: pl.Trainer) -> bool:
        """Whether to make the preemption save here: this process's notice, or with several
        processes any rank's (every rank calls this at the same save points)."""
        debug = getattr(trainer, "fast_dev_run", False)  # Lightning saves nothing then
        if self.watch is None or self.done or trainer.sanity_checking or debug:
            return False  # the same on every rank: no collective
        mine = self.due() is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(mine, all=False))
        return mine

    def at_save_point(self, cb: ModelCheckpoint, trainer: pl.Trainer) -> None:
        """After the save point's scheduled saves: on an agreed notice, write the full state as
        ``cb``'s last checkpoint through the trainer (an asynchronous plugin's writes are
        waited for), drop the previous last one, and stop training."""
        if not self.agreed(trainer):
            return
        path = cb.format_checkpoint_name(cb._monitor_candidates(trainer), cb.CHECKPOINT_NAME_LAST)
        previous, cb.last_model_path = cb.last_model_path, path
        trainer.save_checkpoint(path, weights_only=False)
        trainer.strategy.checkpoint_io.teardown()  # AsyncCheckpointIO: committed before the stop
        cb._last_global_step_saved, cb._last_checkpoint_saved = trainer.global_step, path
        if previous and previous != path and cb._should_remove_checkpoint(trainer, previous, path):
            cb._remove_checkpoint(trainer, previous)
        self.stopped(trainer, path)

    def hold(self, trainer: pl.Trainer) -> None:
        """A notice is pending and the next save point will act on it: keep Lightning from
        ending ``fit`` with its ``SIGTERMException`` in the meantime."""
        if self.due() is not None:
            _clear_sigterm(trainer)

    def stopped(self, trainer: pl.Trainer, url: str) -> None:
        """The preemption save at ``url`` has committed: stop training."""
        trainer.should_stop = True
        _clear_sigterm(trainer)
        self.finish(url, f" at step {trainer.global_step:d}")


def _clear_sigterm(trainer: pl.Trainer) -> None:
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and getattr(connector, "received_sigterm", False):
        connector.received_sigterm = False  # ours handles it: fit returns instead of exiting
