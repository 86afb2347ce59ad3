"""When to save: every N epochs, every N steps, every T seconds, in any combination.

A stateless policy: the caller passes the epoch/step number and the time of the last
save (taken from the checkpoints on storage), so a resumed run needs no saved state.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigurationError

__all__ = ["Schedule", "warn_if_dated_ahead"]

log = logging.getLogger("checkpointer")


def _check_count(name: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"{name} must be a positive int or None, got {value!r}")


@dataclass(frozen=True)
class Schedule:
    """Save points. Each trigger that is not ``None`` can fire; any firing one saves.

    Example::

        s = Schedule(every_n_epochs=None, every_n_steps=100)
        s.at_step(200, since=None, now=0.0)  # "step 200 is a multiple of 100"
    """

    every_n_epochs: int | None = 1
    every_n_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_count("every_n_epochs", self.every_n_epochs)
        _check_count("every_n_steps", self.every_n_steps)
        s = self.every_seconds
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0):
            raise ConfigurationError(f"every_seconds must be a positive number or None, got {s!r}")

    def _timer(self, since: float | None, now: float) -> str | None:
        if self.every_seconds is not None and since is not None and now - since >= self.every_seconds:
            return f"{now - since:.1f}s since the last save (every_seconds={self.every_seconds})"
        return None

    def at_epoch(self, epoch: int, since: float | None, now: float) -> str | None:
        """Why epoch ``epoch``'s end is a save point, or ``None`` when it is not.

        ``since`` is the time of the last save (or of the run's start).
        """
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0:
            return f"epoch {epoch} is a multiple of every_n_epochs={self.every_n_epochs}"
        return self._timer(since, now)

    def at_step(self, step: int, since: float | None, now: float) -> str | None:
        """Why step ``step`` is a save point, or ``None`` when it is not."""
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return f"step {step} is a multiple of every_n_steps={self.every_n_steps}"
        return self._timer(since, now)


def warn_if_dated_ahead(times: Sequence[tuple[str, float]], now: float, category: type[Warning]) -> None:
    """Say when checkpoints (``(name, time)``) are dated in the future (clock skew between
    writers): the every_seconds timer runs on this process's own clock, so it does not
    stall on them."""
    ahead = [(t, n) for n, t in times if t > now + 1.0]
    if ahead:
        t, name = max(ahead)
        msg = (f"{len(ahead)} checkpoint(s) are dated in the future ({name} by {t - now:.0f} s): "
               "clock skew between writers? The every_seconds timer counts on this process's "
               "own clock from now")
        log.warning(msg)
        warnings.warn(msg, category, stacklevel=3)
