"""The preemption watch: real signals in process, chaining, restoring, threads."""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest

from checkpointer.errors import ConfigurationError
from checkpointer.preemption import PreemptionWatch, signal_number


@pytest.fixture(autouse=True)
def _keep_handlers() -> Any:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def test_a_signal_only_sets_the_flag() -> None:
    watch = PreemptionWatch()
    assert watch.requested is None and watch.signals == [signal.SIGTERM, signal.SIGUSR1]
    signal.raise_signal(signal.SIGTERM)  # the default action would end this process
    assert watch.requested == "SIGTERM"
    signal.raise_signal(signal.SIGUSR1)
    assert watch.requested == "SIGTERM"  # the first notice is the one recorded
    watch.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_previous_python_handler_is_chained_and_restored() -> None:
    seen: list[int] = []

    def theirs(signum: int, frame: Any) -> None:
        seen.append(signum)

    signal.signal(signal.SIGUSR2, theirs)
    watch = PreemptionWatch(["USR2"])
    signal.raise_signal(signal.SIGUSR2)
    assert watch.requested == "SIGUSR2" and seen == [signal.SIGUSR2]
    watch.close()
    assert signal.getsignal(signal.SIGUSR2) is theirs


def test_close_leaves_a_handler_installed_after_ours() -> None:
    watch = PreemptionWatch([signal.SIGUSR1])
    later = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    assert later == watch._handle
    watch.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_request_without_signals() -> None:
    watch = PreemptionWatch(())
    assert watch.signals == []
    watch.request()
    assert watch.requested == "requested"


def test_outside_the_main_thread_is_a_clear_error() -> None:
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors))
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], ConfigurationError)
    assert "main thread" in str(errors[0])


def _catch(errors: list[BaseException]) -> None:
    try:
        PreemptionWatch()
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.parametrize("bad", ["SIGNOPE", "KILL", 9, 10_000, 1.5, None, True])
def test_bad_signals_are_configuration_errors(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="preemption_signals"):
        signal_number(bad)


def test_signal_names() -> None:
    assert signal_number("term") == signal_number("SIGTERM") == signal_number(15) == signal.SIGTERM


def test_a_closed_watch_reinstated_by_a_later_handler_acts_as_the_default() -> None:
    """Closed while another handler sat above it, which later puts ours back: a SIGTERM
    must then end the process as it would have without us, not vanish into a dead watch."""
    import subprocess
    import sys

    code = """
import signal
from checkpointer.preemption import PreemptionWatch
watch = PreemptionWatch(["SIGTERM"])
ours = signal.getsignal(signal.SIGTERM)
signal.signal(signal.SIGTERM, lambda *a: None)   # a later handler above ours
watch.close()                                      # ours cannot be removed now
signal.signal(signal.SIGTERM, ours)                # the later one restores what it replaced
signal.raise_signal(signal.SIGTERM)
print("survived")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM and "survived" not in out.stdout


def test_closed_watches_down_a_chain_leave_the_signal_to_the_live_one_above() -> None:
    """Managers made and closed in turn (a notebook, two callbacks) stack their handlers: a
    live watch on top chains down to closed ones, which must not then end the process
    (the live watch took the signal; the process saves and stops as asked)."""
    import subprocess
    import sys

    code = """
import signal
from checkpointer.preemption import PreemptionWatch
a = PreemptionWatch(["SIGTERM"])
b = PreemptionWatch(["SIGTERM"])   # above a
a.close()                          # a cannot be removed: it only forwards now
c = PreemptionWatch(["SIGTERM"])   # above b
b.close()
signal.raise_signal(signal.SIGTERM)
print("survived", c.requested, a.requested, b.requested)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["survived", "SIGTERM", "None", "None"]
