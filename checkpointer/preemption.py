"""Preemption notices: a signal handler that only sets a flag.

Spot instances get SIGTERM and a grace period, SLURM sends a chosen signal before the time
limit (``--signal=USR1@90``), Kubernetes sends SIGTERM. :class:`PreemptionWatch` installs a
handler for each named signal (main thread only: Python delivers signals there); the
handler records the notice and calls the handler it replaced when that one was a Python
function, so a framework's own handler still runs. :meth:`PreemptionWatch.close` puts the
previous handlers back (where ours is still the one installed). The manager reads
:attr:`PreemptionWatch.requested` at each save point and saves there.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from .errors import ConfigurationError

__all__ = ["PreemptionWatch", "DEFAULT_SIGNALS", "signal_number"]

log = logging.getLogger("checkpointer")
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def signal_number(sig: str | int | signal.Signals) -> signal.Signals:
    """``"SIGTERM"``, ``"TERM"``, ``15`` or ``signal.SIGTERM`` as a signal.

    Raises:
        ConfigurationError: not a signal of this platform, or one that cannot be caught.
    """
    try:
        if isinstance(sig, str):
            name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
            num = signal.Signals[name]
        elif isinstance(sig, int) and not isinstance(sig, bool):
            num = signal.Signals(sig)
        else:
            raise TypeError(sig)
    except (KeyError, ValueError, TypeError):
        raise ConfigurationError(f"preemption_signals: {sig!r} is not a signal of this platform") from None
    if num in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)):
        raise ConfigurationError(f"preemption_signals: {num.name} cannot be caught")
    return num


class PreemptionWatch:
    """Records a preemption notice from any of ``signals`` (or :meth:`request`).

    Raises:
        ConfigurationError: built outside the main thread, or a bad signal name.
    """

    def __init__(self, signals: Sequence[str | int | signal.Signals] = DEFAULT_SIGNALS) -> None:
        if isinstance(signals, (str, int)):
            signals = (signals,)
        nums = list(dict.fromkeys(signal_number(s) for s in signals))
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError(
                "save_on_preemption=True installs signal handlers, which Python allows only on "
                "the main thread: build the manager there (or pass preemption_signals=() and "
                "call request_preemption() from your own notice watcher)")
        self.requested: str | None = None  # why: the signal's name, or "requested"
        self._previous: dict[signal.Signals, _Handler] = {}
        for num in nums:
            self._previous[num] = signal.signal(num, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name
        previous = self._previous.get(signal.Signals(signum))
        if callable(previous):
            previous(signum, frame)

    def request(self, why: str = "requested") -> None:
        """Record a notice as a signal would (a cloud notice watcher, a test)."""
        if self.requested is None:
            self.requested = why

    @property
    def signals(self) -> list[signal.Signals]:
        """The signals watched (until :meth:`close`)."""
        return list(self._previous)

    def close(self) -> None:
        """Put back each handler that ours replaced, where ours is still installed."""
        for num, previous in self._previous.items():
            try:
                if signal.getsignal(num) == self._handle:
                    signal.signal(num, previous if previous is not None else signal.SIG_DFL)
            except ValueError:  # not the main thread: the handler stays, and only sets a flag
                log.warning("could not restore the handler of %s outside the main thread", num.name)
        self._previous = {}
