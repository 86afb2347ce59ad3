"""Preemption notices: a signal handler that only sets a flag.

Spot instances get SIGTERM and a grace period, SLURM sends a chosen signal before the time
limit (``--signal=USR1@90``), Kubernetes sends SIGTERM. :class:`PreemptionWatch` installs a
handler for each named signal (main thread only: Python delivers signals there); the
handler records the notice and calls the handler it replaced when that one was a Python
function, so a framework's own handler still runs. :meth:`PreemptionWatch.close` puts the
previous handlers back (where ours is still the one installed). The manager reads
:attr:`PreemptionWatch.requested` at each save point and saves there;
:class:`PreemptionSession` is a framework callback's watch across its ``fit`` calls.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, ClassVar

from .distributed import Coordinator, pack, unpack
from .errors import ConfigurationError
from .info import CheckpointInfo

__all__ = ["Preemption", "PreemptionWatch", "PreemptionSession", "preemption_options", "DEFAULT_SIGNALS", "signal_number", "PREEMPTION"]

log = logging.getLogger("checkpointer")
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
PREEMPTION = "preemption"  # how a preemption save's reason starts
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


def preemption_options(enabled: Any, signals: Sequence[str | int | signal.Signals] | str | int
                       ) -> tuple[signal.Signals, ...]:
    """Check ``save_on_preemption`` / ``preemption_signals`` (for the manager and the
    framework callbacks alike); the signals, each once.

    Raises:
        ConfigurationError: ``enabled`` is not a bool, or a signal is not one that can be caught.
    """
    if not isinstance(enabled, bool):
        raise ConfigurationError(f"save_on_preemption must be True or False, got {enabled!r}")
    names = [signals] if isinstance(signals, (str, int)) else list(signals)
    return tuple(dict.fromkeys(signal_number(s) for s in names))


class PreemptionWatch:
    """Records a preemption notice from any of ``signals`` (or :meth:`request`).

    Raises:
        ConfigurationError: built outside the main thread, or a bad signal name.
    """

    def __init__(self, signals: Sequence[str | int | signal.Signals] = DEFAULT_SIGNALS) -> None:
        if isinstance(signals, (str, int)):
            signals = (signals,)
        nums = list(dict.fromkeys(signal_number(s) for s in signals))
        if nums and threading.current_thread() is not threading.main_thread():
            raise ConfigurationError(
                "save_on_preemption=True installs signal handlers, which Python allows only on "
                "the main thread: build the manager there (or pass preemption_signals=() and "
                "call request_preemption() from your own notice watcher)")
        self.requested: str | None = None  # why: the signal's name, or "requested"
        self._closed = False
        self._previous: dict[signal.Signals, _Handler] = {}
        for num in nums:
            self._previous[num] = signal.signal(num, self._handle)
        self._watched = list(self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        num = signal.Signals(signum)
        previous = self._previous.get(num)
        if not self._closed and self.requested is None:
            self.requested = num.name
        if callable(previous):
            previous(signum, frame)
        elif self._closed and previous in (signal.SIG_DFL, None) and signal.getsignal(num) == self._handle:
            # closed, yet reinstated as the process's handler by one that sat above ours: act
            # as the default would (called down a chain instead, a live handler above took it)
            signal.signal(num, signal.SIG_DFL)
            signal.raise_signal(num)

    def request(self, why: str = "requested") -> None:
        """Record a notice as a signal would (a cloud notice watcher, a test)."""
        if self.requested is None:
            self.requested = why

    @property
    def signals(self) -> list[signal.Signals]:
        """The signals watched (until :meth:`close`)."""
        return list(self._watched)

    def close(self) -> None:
        """Put back each handler that ours replaced, where ours is still installed. Where a
        later handler sits above ours (and may reinstate it), ours only forwards from now on."""
        self._closed = True
        for num, previous in self._previous.items():
            try:
                if signal.getsignal(num) == self._handle:
                    signal.signal(num, previous if previous is not None else signal.SIG_DFL)
            except ValueError:  # not the main thread: the handler stays, and only forwards
                log.warning("could not restore the handler of %s outside the main thread", num.name)
        self._watched = []


class PreemptionSession:
    """One framework callback's preemption state across ``fit`` calls: from :meth:`start`
    (training begins) to :meth:`close` (it ends) a :class:`PreemptionWatch` records a signal;
    the callback asks :meth:`due` at each save point, saves, waits for the commit, calls
    :meth:`finish` and tells its framework to stop. Callbacks may end in another order than
    they began, but a watch can restore its predecessor only while installed: :meth:`close`
    releases this one, then closes the released ones at the top of the stack.

    Raises:
        ConfigurationError: ``enabled`` not a bool or a signal that cannot be caught (at
            construction); :meth:`start` outside the main thread.

    Example:
        >>> session = PreemptionSession(True, DEFAULT_SIGNALS)
        >>> session.start()                       # training begins
        >>> if session.due():                     # at a save point: save, wait, then
        ...     session.finish(url)               # and stop the training loop
        >>> session.close()                       # training ends
    """

    _stack: ClassVar[list[PreemptionWatch]] = []  # this process's open watches, oldest first
    _released: ClassVar[set[PreemptionWatch]] = set()  # their callbacks have ended

    def __init__(self, enabled: Any, signals: Sequence[str | int | signal.Signals] | str | int) -> None:
        self.signals = preemption_options(enabled, signals)
        self.enabled: bool = enabled
        self.watch: PreemptionWatch | None = None
        self.done = False  # the preemption save has committed and training was told to stop

    def __eq__(self, other: object) -> bool:  # a pickled callback compares equal (vars)
        return isinstance(other, PreemptionSession) and (self.signals, self.enabled, self.done) == (
            other.signals, other.enabled, other.done)

    __hash__ = None  # type: ignore[assignment]

    def start(self) -> None:
        """Install the handlers for a new ``fit`` (a notice from an earlier one is dropped)."""
        self.close()
        self.done = False
        if self.enabled:
            self.watch = PreemptionWatch(self.signals)
            self._stack.append(self.watch)

    def due(self) -> str | None:
        """This process's notice to act on now (the signal's name), or ``None``."""
        return None if self.done or self.watch is None else self.watch.requested

    def finish(self, url: str | None, where: str = "") -> None:
        """The preemption save at ``url`` (``where``: e.g. " at step 7") has committed:
        record it and log that training stops (the caller tells its framework)."""
        self.done = True
        why = self.watch.requested if self.watch is not None else None
        log.warning("preemption (%s): saved %s%s; training stops", why or "another rank", url, where)

    def close(self) -> None:
        """Put the previous signal handlers back (once the watches above this one are gone)."""
        if self.watch is None:
            return
        self._released.add(self.watch)
        self.watch = None
        while self._stack and self._stack[-1] in self._released:
            top = self._stack.pop()
            self._released.discard(top)
            top.close()


class Preemption:
    """A manager's preemption state: the watch (with ``save_on_preemption``), a notice asked
    for by :meth:`request`, and the info of the preemption save once it has committed.

    With several processes and a watch, :meth:`notice` shares every rank's notice at each
    save point (one small collective: the coordinator's ``any_flag(bool)`` when it has one,
    e.g. an all-reduce, else a gather on rank 0), so a signal on any rank preempts all of
    them at the same call.
    """

    def __init__(self, enabled: bool, signals: Sequence[str | int | signal.Signals]) -> None:
        nums = preemption_options(enabled, signals)
        self.watch = PreemptionWatch(nums) if enabled else None
        self.asked: str | None = None
        self.done: CheckpointInfo | None = None  # the preemption save, once committed

    def request(self) -> None:
        """As if a preemption signal had arrived (a cloud notice watcher, a test)."""
        self.asked = self.asked or "requested"

    def local(self) -> str | None:
        """This process's notice, if any: the signal's name, or "requested"."""
        return (self.watch.requested if self.watch is not None else None) or self.asked

    def notice(self, coord: Coordinator) -> str | None:
        """The notice to act on here: this process's, or (several processes with a watch)
        the first of every rank's, on rank 0 (the others learn it from rank 0's plan)."""
        mine = self.local()
        if coord.world_size == 1 or self.watch is None:
            return mine
        any_flag = getattr(coord, "any_flag", None)  # a coordinator's cheaper collective
        if any_flag is not None:
            return (mine or "a notice on another rank") if any_flag(mine is not None) else None
        rows = coord.gather_bytes(pack(mine))
        if rows is None:
            return mine
        return next((n for n in map(unpack, rows) if isinstance(n, str)), None)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        if self.watch is not None:
            self.watch.close()
