"""``save_on_preemption`` of the Lightning ``ModelCheckpoint``: watch, agree, stop.

With ``save_on_preemption=True`` (signals from ``preemption_signals``, default SIGTERM and
SIGUSR1) the next save point after a signal (a training batch end, the end of validation or
of the training epoch) makes its scheduled saves, then writes the full training state as
the last checkpoint (``CHECKPOINT_NAME_LAST``, also without ``save_last`` and with
``save_weights_only``), committed, and stops training (``trainer.should_stop``): ``fit``
returns normally and ``callback.preempted`` is True. The next
``trainer.fit(ckpt_path="last")`` resumes from that point; mid-epoch, Lightning needs a
resumable train loader (``state_dict`` / ``load_state_dict``) to continue the epoch with the
batches not yet seen. Under DDP a signal on any rank stops every rank at the same point.

The core's :class:`~checkpointer.preemption.PreemptionWatch` is installed at
``on_train_start``, after the Trainer has put its own SIGTERM handler in place, so ours runs
first and then Lightning's; the Trainer's teardown puts back the handlers it found before
``fit``, which removes ours as well. At each save point the callback asks :meth:`agreed`
(with several processes one all-reduce: a notice on any rank counts on every rank, at the
same point), saves, and calls :meth:`stopped`: ``trainer.should_stop``.

Lightning also acts on SIGTERM by itself: it raises ``SIGTERMException`` (a ``SystemExit``)
after the batch, or in the middle of validation. Once the callback has taken the notice
over (:meth:`hold`, :meth:`stopped`) it clears the Trainer's flag, so that ``fit`` stops at
our save and returns normally. A notice during validation waits for the end of validation,
or, where the callback saves at the end of the training epoch (Lightning's default), for
that save point, so that the epoch's scheduled checkpoint is written too. A SIGTERM that
Lightning sees before any of our hooks does (the few lines after the batch-end hooks)
still ends ``fit`` with Lightning's exception, the last committed checkpoint kept. Under
DDP, send SIGTERM to every rank, or another signal to any: Lightning 2.6's SIGTERM handler
runs a collective inside the handler, which desynchronises ranks signalled alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from checkpointer.preemption import PreemptionWatch, preemption_options

__all__ = ["LightningPreemption"]

log = logging.getLogger("checkpointer")


class LightningPreemption:
    """One callback's preemption state across ``fit`` calls.

    Raises:
        ConfigurationError: ``enabled`` not a bool or a signal that cannot be caught (at
            construction); :meth:`start` outside the main thread.
    """

    def __init__(self, enabled: Any, signals: Sequence[str | int] | str | int) -> None:
        self.signals = preemption_options(enabled, signals)
        self.enabled = enabled
        self.watch: PreemptionWatch | None = None
        self.done = False  # the preemption save has committed; the trainer was told to stop

    def start(self) -> None:
        """Install the handlers for a new ``fit`` (an earlier notice is dropped)."""
        self.close()
        self.done = False
        if self.enabled:
            self.watch = PreemptionWatch(self.signals)

    def due(self) -> str | None:
        """This process's notice to act on (the signal's name), or ``None``."""
        return None if self.done or self.watch is None else self.watch.requested

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

    def hold(self, trainer: pl.Trainer) -> None:
        """A notice is pending and the next save point will act on it: keep Lightning from
        ending ``fit`` with its ``SIGTERMException`` in the meantime."""
        if self.due() is not None:
            _clear_sigterm(trainer)

    def stopped(self, trainer: pl.Trainer, url: str) -> None:
        """The preemption save at ``url`` has committed: stop training."""
        self.done = True
        trainer.should_stop = True
        _clear_sigterm(trainer)
        why = self.watch.requested if self.watch is not None else None
        log.warning("preemption (%s): saved %s at step %d; training stops", why or "another rank",
                    url, trainer.global_step)  # fmt: skip

    def close(self) -> None:
        """Put the previous handlers back (where the Trainer has not already)."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None


def _clear_sigterm(trainer: pl.Trainer) -> None:
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and getattr(connector, "received_sigterm", False):
        connector.received_sigterm = False  # ours handles it: fit returns instead of exiting
