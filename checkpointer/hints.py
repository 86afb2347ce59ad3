"""What a user probably meant: the "did you mean" part of error messages.

Plain functions over names: a close match by :mod:`difflib`, the options other libraries
call by another name (Orbax, Lightning, Keras habits), what ``restore(which)`` could have
meant, and a :class:`~checkpointer.info.Checkpoint` passed where its state belongs.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .errors import CheckpointNotFoundError, StateTreeError, UnknownOptionError
from .info import Checkpoint, CheckpointInfo

__all__ = ["close_names", "did_you_mean", "unknown_options", "restore_not_found",
           "refuse_checkpoint"]


def close_names(word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.8) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to ``word`` (``difflib`` ratio >= ``cutoff``),
    best first; an exact match up to case comes first."""
    pool = sorted(set(candidates))
    exact = [c for c in pool if c.lower() == word.lower() and c != word]
    near = difflib.get_close_matches(word, pool, n=n, cutoff=cutoff)
    return (exact + [c for c in near if c not in exact and c != word])[:n]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` (or ``'x' or 'y'``), or ``""`` when nothing is close."""
    found = close_names(word, candidates)
    return f"did you mean {' or '.join(map(repr, found))}?" if found else ""


# Options of other checkpointing libraries: name -> (whose, what to pass here; {v}: the value)
_HABITS: dict[str, tuple[str, str]] = {
    "max_to_keep": ("an Orbax", "keep_last={v}, and keep_best=K with a monitor to keep the best K too"),
    "keep_period": ("an Orbax", "keep_every_n_steps={v}"),
    "keep_time_interval": ("an Orbax", "keep_every_seconds=<seconds>"),
    "save_interval_steps": ("an Orbax", "every_n_steps={v}"),
    "best_fn": ("an Orbax", "monitor='<metric name>' and mode='min' or 'max'"),
    "best_mode": ("an Orbax", "mode={v}"),
    "enable_async_checkpointing": ("an Orbax", "async_save={v}"),
    "save_top_k": ("a Lightning", "keep_best={v}, with a monitor"),
    "every_n_train_steps": ("a Lightning", "every_n_steps={v}"),
    "train_time_interval": ("a Lightning", "every_seconds=<seconds>"),
    "dirpath": ("a Lightning", "the directory as the first argument"),
    "save_last": ("a Lightning", "nothing: the newest checkpoint is always kept"),
    "filepath": ("a Keras", "the directory as the first argument, and filename=<template>"),
    "save_freq": ("a Keras", "every_n_steps=N or every_n_epochs=N"),
    "period": ("a Keras", "every_n_epochs={v}"),
}


def unknown_options(owner: str, given: Mapping[str, Any], signature_of: Callable[..., Any]
                    ) -> UnknownOptionError:
    """The error for keywords ``owner`` does not take: each named with its value and what to
    pass instead (another library's name for an option, or the nearest real one).

    ``signature_of``: the callable whose keyword-only parameters are the real options.
    """
    params = inspect.signature(signature_of).parameters.values()
    options = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    parts = []
    for name, value in given.items():
        shown = f"{value!r:.40}"
        if name in _HABITS:
            whose, advice = _HABITS[name]
            parts.append(f"{name}={shown}: {whose} option; here pass {advice.format(v=shown)}")
            continue
        near = close_names(name, options, n=1)
        parts.append(f"{name}={shown}: " + (f"did you mean {near[0]!r}?" if near
                                            else f"the options are {', '.join(options)}"))
    return UnknownOptionError(f"{owner} got unknown option{'s' if len(parts) > 1 else ''}: "
                              + "; ".join(parts))


_RESTORE_ALIASES = {"last": "latest", "newest": "latest", "recent": "latest",
                    "most_recent": "latest", "top": "best", "top1": "best"}


def restore_not_found(url: str, which: str | int, infos: Sequence[CheckpointInfo],
                      tried: bool) -> CheckpointNotFoundError:
    """The error for ``restore(which)`` that found nothing (``tried``: some matched, none
    verified): the steps or names that are there, and what ``which`` may have meant."""
    if tried:
        return CheckpointNotFoundError(f"no checkpoint in {url} matches {which!r} and verifies")
    if not infos:
        return CheckpointNotFoundError(f"no checkpoint matches {which!r}: {url} holds no checkpoint")
    if isinstance(which, int):
        steps = sorted({i.step for i in infos if i.step is not None})
        there = (f"the steps there: {_few(steps)}" if steps else
                 "no checkpoint there records a step; restore by name: " + _few([i.name for i in infos]))
        return CheckpointNotFoundError(f"no checkpoint in {url} has step {which}; {there}")
    if which == "best":
        return CheckpointNotFoundError(f"no checkpoint in {url} records the monitored metric, so "
                                       "none ranks as best; restore('latest') takes the newest")
    names = [i.name for i in infos]
    hint = (f"did you mean {_RESTORE_ALIASES[which.lower()]!r}?" if which.lower() in _RESTORE_ALIASES
            else f"pass the int {int(which)} for a step" if which.isdigit()
            else did_you_mean(which, [*names, "latest", "best"]))
    return CheckpointNotFoundError(
        f"no checkpoint in {url} is named {which!r}" + (f": {hint}" if hint else "")
        + f" (restore takes 'latest', 'best', a name or a step; names there: {_few(names)})")


def _few(items: Sequence[Any], most: int = 8) -> str:
    """``items`` joined, the middle elided past ``most``."""
    if len(items) <= most:
        return ", ".join(map(str, items))
    half = most // 2
    return ", ".join(map(str, [*items[:half], "...", *items[-half:]])) + f" ({len(items)} in all)"


def refuse_checkpoint(value: Any, where: str = "state") -> None:
    """Raise when ``value`` is a :class:`Checkpoint` (what ``restore`` returns) or a
    :class:`CheckpointInfo` where a state tree belongs: say what to pass instead.

    Raises:
        StateTreeError: ``value`` is one of those.
    """
    if isinstance(value, Checkpoint):
        raise StateTreeError(f"{where}: a Checkpoint (what restore() returns) is not a state "
                             "tree: pass its .state")
    if isinstance(value, CheckpointInfo):
        raise StateTreeError(f"{where}: a CheckpointInfo describes a checkpoint and holds no "
                             f"state: load it with checkpointer.load({value.url!r})")
