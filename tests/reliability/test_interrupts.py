"""Interrupts (Ctrl-C, any ``BaseException``) delivered for real during asynchronous saves.

A signal can land anywhere in the training thread: while ``stage`` waits for the save in
flight, during the copy into the staging arena, between staging and submitting, inside
``submit``, inside ``close``. Whatever it hits, no two saves may share staging memory and
every committed checkpoint must hold exactly the state given to its own call, read lazily
(``checkpointer.open(url).tensor(key)``) and in full (``checkpointer.load``, ``restore``).

The chosen-point tests deliver one signal at one named moment each: from a helper thread
once the training thread is seen parked on a lock inside the writer (``pthread_kill``), or
from the training thread itself (``raise_signal``) inside a wrapped step. The campaign
delivers them at seeded random moments from a timer thread and reports where they landed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest

import checkpointer
from checkpointer import CheckpointError, CheckpointManager
from checkpointer import commit as commit_mod
from checkpointer.async_save import AsyncWriter
from checkpointer.tree import flatten

PKG = Path(checkpointer.__file__).resolve().parent
MAIN = threading.main_thread()
GATE_S = 60.0  # a held write or a poller gives up after this (only when a test fails)
_TEST_OVER = [threading.Event()]  # set when the running test ends: its pollers stop
Hold = Callable[[int], threading.Event]  # held(step): that step's write starts once it is set


def make_state(step: int, n: int = 1 << 12) -> dict[str, Any]:
    """Every tensor of step ``step`` is filled with ``step`` (big-endian and strided too)."""
    return {
        "step": step,
        "f32": np.full(n, step, np.float32),
        "i64": np.full(n // 2, step, np.int64),
        "opt": {
            "f16": np.full((n // 8, 4), step, np.float16),
            "u16": np.full(n // 4 + 3, step, np.uint16),
        },
        "be": np.full(n // 4, step, ">i4"),
        "strided": np.full((n // 16, 8), step, np.float64)[:, ::2],
    }


def assert_tree(tree: dict[str, Any], step: int, n: int, what: str) -> None:
    """``tree`` (key -> array) has ``make_state(step, n)``'s keys and shapes, all ``step``."""
    want = {k: a.shape for k, a in flatten(make_state(step, n))[1]}
    assert {k: a.shape for k, a in tree.items()} == want, what
    bad = {k: np.unique(a)[:3].tolist() for k, a in tree.items() if not bool((a == step).all())}
    assert not bad, f"{what} holds {bad} instead of {step}"


def assert_holds(url: str, step: int, n: int = 1 << 12) -> None:
    """The checkpoint at ``url`` holds exactly ``make_state(step, n)``: lazily and in full."""
    with checkpointer.open(url) as reader:
        assert_tree({k: reader.tensor(k) for k in reader.keys()}, step, n, f"{url} (lazily)")
    state = checkpointer.load(url)
    assert state["step"] == step
    assert_tree(dict(flatten(state)[1]), step, n, f"{url} (loaded)")


def assert_all_hold(
    mgr: CheckpointManager, steps: list[int], size: Callable[[int], int] = lambda step: 1 << 12
) -> None:
    """``mgr`` lists exactly ``steps``, each holding ``make_state(step, size(step))``:
    lazily, in full and through ``restore``."""
    assert [c.step for c in mgr.checkpoints] == steps
    for info in mgr.checkpoints:
        assert info.step is not None
        assert_holds(info.url, info.step, size(info.step))
        restored = mgr.restore(info.step).state
        assert restored["step"] == info.step
        assert_tree(dict(flatten(restored)[1]), info.step, size(info.step), info.url)


def frames(frame: FrameType | None = None) -> list[tuple[Path, str]]:
    """(file, function) of ``frame`` and its callers (default: the training thread's)."""
    frame = frame or sys._current_frames().get(MAIN.ident or 0)
    out = []
    while frame is not None:
        out.append((Path(frame.f_code.co_filename), frame.f_code.co_name))
        frame = frame.f_back
    return out


def parked_in(*funcs: str) -> bool:
    """The training thread is blocked on a lock inside each of these writer methods."""
    chain = [(path.name, func) for path, func in frames()]
    parked = bool(chain) and chain[0][0] == "threading.py"
    return parked and all(("async_save.py", f) in chain for f in funcs)


def when_main(pred: Callable[[], bool], action: Callable[[], None]) -> None:
    """Run ``action`` from a helper thread once ``pred()`` holds (never after the test)."""
    over = _TEST_OVER[0]

    def poll() -> None:
        deadline = time.monotonic() + GATE_S
        while time.monotonic() < deadline and not over.is_set():
            if pred():
                return action()
            time.sleep(0.001)

    threading.Thread(target=poll, daemon=True).start()


@pytest.fixture(autouse=True)
def _stop_pollers() -> Iterator[None]:
    _TEST_OVER[0] = threading.Event()
    yield
    _TEST_OVER[0].set()


@contextlib.contextmanager
def raising(exc: type[BaseException] = KeyboardInterrupt) -> Iterator[Callable[[], None]]:
    """For the block, a handler raising ``exc``: Python's own SIGINT handler, or one on
    SIGUSR1 for other exceptions. Gives the call that signals the training thread."""
    assert threading.current_thread() is MAIN, "signals are handled by the main thread only"
    signum = signal.SIGINT if exc is KeyboardInterrupt else signal.SIGUSR1

    def handler(signum: int, frame: object) -> None:
        raise exc(f"from the handler of signal {signum}")

    old = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else handler)
    try:
        yield lambda: signal.pthread_kill(MAIN.ident or 0, signum)
    finally:
        signal.signal(signum, old)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Hold:
    """Holds background writes: ``held(step)`` gives the event that lets that step's go."""
    gates: dict[int, threading.Event] = {}
    real = commit_mod.write_checkpoint

    def write(*args: Any, **kwargs: Any) -> Any:
        gate = gates.get(args[4]["step"])
        if gate is not None and not gate.wait(GATE_S):
            raise AssertionError(f"step {args[4]['step']}: its write was never let go")
        return real(*args, **kwargs)

    monkeypatch.setattr(commit_mod, "write_checkpoint", write)
    return lambda step: gates.setdefault(step, threading.Event())


def _writer(mgr: CheckpointManager) -> AsyncWriter[Any]:
    assert mgr._async is not None
    return mgr._async


def _save_3_releasing(mgr: CheckpointManager, gate: threading.Event | None) -> None:
    """Save step 3; ``gate`` (a held earlier write) opens once the save waits for it, or
    once it returned without waiting (the bug: its arena is then the held save's)."""
    returned = threading.Event()
    if gate is not None:
        when_main(lambda: returned.is_set() or parked_in("wait"), gate.set)
    mgr.save(make_state(3), step=3)
    returned.set()


# -- an interrupt while waiting for the save in flight -----------------------------------


class Stop(BaseException):
    """Neither an ``Exception`` nor a ``KeyboardInterrupt``: any ``BaseException``."""


WAITING_CALLS: dict[str, Callable[[CheckpointManager], Any]] = {
    "save": lambda mgr: mgr.save(make_state(2), step=2),  # stage() waits for step 1
    "epoch_end": lambda mgr: mgr.epoch_end(2, lambda: make_state(2)),
    "wait": lambda mgr: mgr.wait(),
    "restore": lambda mgr: mgr.restore("latest"),
}


@pytest.mark.parametrize(
    ("call", "exc"),
    [(c, KeyboardInterrupt) for c in sorted(WAITING_CALLS)]
    + [("save", SystemExit), ("save", Stop)],
)
def test_interrupt_while_waiting_keeps_the_save_in_flight(
    tmp_path: Path, held: Hold, call: str, exc: type[BaseException]
) -> None:
    gate = held(1)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(make_state(1), step=1)
    with raising(exc) as poke, pytest.raises(exc):
        when_main(lambda: parked_in("wait"), poke)
        WAITING_CALLS[call](mgr)
    in_flight, pending = _writer(mgr).busy, _writer(mgr).pending
    _save_3_releasing(mgr, gate)  # must wait for step 1 again, not reuse its arena
    mgr.close()
    assert_all_hold(mgr, [1, 3])
    assert in_flight and pending is not None and pending.step == 1


def test_interrupt_inside_close_leaves_the_save_in_flight(tmp_path: Path, held: Hold) -> None:
    gate = held(1)
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(make_state(1), step=1)
    later = threading.Event()  # a close that joins the worker first needs the write let go
    when_main(lambda: later.is_set() or "shutdown" in [f for _, f in frames()], gate.set)
    with raising() as poke, pytest.raises(KeyboardInterrupt):
        when_main(lambda: parked_in("close", "wait"), poke)
        mgr.close()
    in_flight = _writer(mgr).busy
    later.set()
    mgr.close()  # waits for it now, then stops the worker
    assert not _writer(mgr).busy and _writer(mgr).capacity == 0
    assert_all_hold(mgr, [1])
    assert in_flight, "close() forgot the save it was interrupted waiting for"


# -- an interrupt raised in the training thread at a chosen step -------------------------


def _signal_at_call(real: Callable[..., Any], nth: int, before: bool) -> Callable[..., Any]:
    """``real``, raising SIGINT in this thread around its ``nth`` call (0: the first)."""
    calls = itertools.count()

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        fire = next(calls) == nth
        if fire and before:
            signal.raise_signal(signal.SIGINT)
        out = real(*args, **kwargs)
        if fire:
            signal.raise_signal(signal.SIGINT)
        return out

    return wrapped


POINTS = {  # where step 2's save is interrupted -> the steps committed in the end
    "copying": [1, 3],  # copying its third array into the arena (step 1 collected first)
    "staged": [1, 3],  # after stage() returned, before the manager submits
    "queued": [1, 2, 3],  # inside submit: the job queued on the worker, not yet recorded
    "unqueued": [1, 2, 3],  # inside submit, before the job reached the worker
}


@pytest.mark.parametrize("point", sorted(POINTS))
def test_interrupt_at_a_chosen_point_of_a_save(
    tmp_path: Path,
    held: Hold,
    monkeypatch: pytest.MonkeyPatch,
    point: str,
) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    writer, gate = _writer(mgr), None
    mgr.save(make_state(1), step=1)
    if point == "copying":
        monkeypatch.setattr(writer, "_copy", _signal_at_call(writer._copy, 2, before=True))
    elif point == "staged":
        monkeypatch.setattr(writer, "stage", _signal_at_call(writer.stage, 0, before=False))
    else:  # the worker is busy with step 2 for as long as step 3 might stage over it
        gate, submit = held(2), writer._executor.submit
        hook = _signal_at_call(submit, 0, before=point == "unqueued")
        monkeypatch.setattr(writer._executor, "submit", hook)
    with raising(), pytest.raises(KeyboardInterrupt):
        mgr.save(make_state(2), step=2)
    _save_3_releasing(mgr, gate)
    mgr.close()
    assert_all_hold(mgr, POINTS[point])


# -- staging memory that cannot be allocated ---------------------------------------------


def test_staging_memory_that_cannot_be_allocated(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, async_save=True)
    writer = _writer(mgr)
    mgr.save(make_state(1), step=1)
    assert writer.capacity > 0
    huge = np.broadcast_to(np.float64(1.0), (1 << 58,))  # 2 EiB: no machine has it
    msg = r"cannot allocate 2305843009213693952 bytes of staging memory for an async save"
    with pytest.raises(CheckpointError, match=msg) as err:
        mgr.save({"w": huge}, step=2)
    assert isinstance(err.value.__cause__, MemoryError)
    assert writer.capacity == 0 and not writer.busy  # the old arena freed, nothing in flight
    mgr.save(make_state(3), step=3)  # and the writer still works
    mgr.close()
    assert_all_hold(mgr, [1, 3])


# -- the campaign: SIGINT at random moments ----------------------------------------------

SAVES = 160
TRAIN_S = 0.006  # at most this long "training" between saves: the save in flight may end


def campaign_n(step: int) -> int:
    """0.6 or 1.2 MiB a save (the arena grows again after each close frees it)."""
    return 1 << (16 + (step % 3 == 0))


def landed_in(chain: list[tuple[Path, str]]) -> str | None:
    """Where a signal landed (``chain``: :func:`frames`): the writer method it hit (a wait
    named by its caller), the manager's own code, or ``None`` outside the library."""
    names = [(p.stem, f) for p, f in chain if p.parent == PKG and not f.startswith("<")]
    for i, (mod, func) in enumerate(names):
        if mod == "async_save" and func == "wait":
            mod, func = next(
                ((m, f) for m, f in names[i + 1 :] if m in ("async_save", "manager")), ("", "?")
            )
            return f"wait (in {'manager.' if mod == 'manager' else ''}{func})"
        if mod == "async_save":
            return {"_copy": "stage (copying)", "_start": "submit"}.get(func, func)
    if not names:
        return None
    return "manager" if names[0][0] == "manager" else f"library ({names[0][0]})"


class Interrupter:
    """SIGINT at seeded random delays, to the training thread (``pthread_kill``) or to the
    process (``os.kill``), for the ``with`` block. A signal that lands inside the library
    raises ``KeyboardInterrupt`` there, as Python's own handler would; one that lands in
    the test's own code is counted and ignored, so that the test's loop is never torn."""

    def __init__(self, seed: int, max_delay: float) -> None:
        self.rng, self.max_delay = random.Random(seed), max_delay
        self.sent, self.landed = 0, Counter[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        where = landed_in(frames(frame))
        self.landed[where or "outside the library (ignored)"] += 1
        if where is not None:
            raise KeyboardInterrupt

    def _aim(self) -> None:
        """Wait (a little) until the training thread runs library code, not parked on a lock
        (with a short switch interval: any bytecode), where a random moment rarely falls."""
        deadline = time.monotonic() + 0.02
        while time.monotonic() < deadline and not self._stop.is_set():
            chain = frames()
            if chain and chain[0][0].name != "threading.py" and landed_in(chain) is not None:
                return
            time.sleep(0)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.0, self.max_delay)):
            if self.rng.random() < 0.5:
                self._aim()
            if self.rng.random() < 0.5:
                signal.pthread_kill(MAIN.ident or 0, signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)
            self.sent += 1

    def __enter__(self) -> Interrupter:
        assert threading.current_thread() is MAIN
        self._old = signal.signal(signal.SIGINT, self.handler)
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        time.sleep(0.05)  # a signal sent last lands here, in the test: ignored
        sys.setswitchinterval(self._switch)
        signal.signal(signal.SIGINT, self._old)


def test_random_interrupt_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trials: Counter[str]
) -> None:
    commits: list[int] = []
    problems: list[str] = []
    real = commit_mod.write_checkpoint

    def checked(*args: Any, **kwargs: Any) -> Any:  # in the writer thread, before retention
        out = real(*args, **kwargs)
        step = args[4]["step"]
        try:
            assert_holds(args[0].url_of(args[1]), step, campaign_n(step))
        except (AssertionError, CheckpointError) as exc:
            problems.append(f"step {step}: {exc}")
        commits.append(step)
        return out

    monkeypatch.setattr(commit_mod, "write_checkpoint", checked)
    mgr = CheckpointManager(tmp_path, async_save=True, keep_last=4)
    returned: list[int] = []
    train = random.Random(7)
    with Interrupter(seed=20240611, max_delay=0.012) as irq:
        for step in range(1, SAVES + 1):
            try:
                mgr.save(make_state(step, campaign_n(step)), step=step)
                returned.append(step)
                if step % 10 == 0:
                    mgr.wait()
                if step % 25 == 7:
                    mgr.close()  # the manager saves again after close()
            except KeyboardInterrupt:
                pass
            time.sleep(train.uniform(0.0, TRAIN_S))
    mgr.close()
    hits = {k: v for k, v in irq.landed.items() if "ignored" not in k}
    print(f"\n{irq.sent} SIGINTs sent; where they landed: {dict(sorted(irq.landed.items()))}")
    for where, count in hits.items():
        trials[f"interrupts landed in {where}"] += count
    trials["interrupt campaign saves"] += SAVES
    trials["interrupt campaign checkpoints verified at commit"] += len(commits)
    assert not problems, problems[:3]
    assert len(commits) == len(set(commits)), "a step was committed twice"
    assert set(returned) <= set(commits), "a save that returned was lost"
    assert_all_hold(mgr, sorted(commits)[-4:], campaign_n)
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints] == sorted(commits)[-4:]
    assert sum(hits.values()) >= 20, irq.landed
    assert any(k.startswith("wait") for k in hits), irq.landed
