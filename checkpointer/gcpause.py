"""Pause Python's cyclic garbage collector while the engine builds many small objects.

Saving or loading 10,000 tensors creates tens of thousands of short-lived lists, tuples
and arrays; in a process holding a large heap (a framework imported, a model in memory)
each allocation burst triggers full collections that scan that heap, which doubled the
per-tensor cost in the benchmarks. Reference counting still frees everything at once;
only the cycle detector waits. Only the main thread pauses it (a background writer never
does, so a training loop's collections are never held up), and only when it was on.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

__all__ = ["gc_paused", "without_gc"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block (main thread only, when it was enabled)."""
    if threading.current_thread() is not threading.main_thread() or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def without_gc(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator form of :func:`gc_paused`."""
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with gc_paused():
            return fn(*args, **kwargs)
    return wrapper
