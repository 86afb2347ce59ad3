"""The contract every adapter keeps, written once and run for each adapter.

An adapter is described by a :class:`Case`; ``CHECKS`` are the contract's checks. The
torch and JAX cases run in-process (``test_adapter_contract.py``); the Keras case runs in each Keras
backend's own subprocess (``keras_cases_contract.py``), since Keras picks its backend at
import.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import checkpointer
import checkpointer.tree
from checkpointer.errors import CheckpointError, StateTreeError


@dataclass(frozen=True)
class Case:
    """One adapter, seen through the verbs of DESIGN section 16.

    ``load_state(obj, state, strict)`` and ``load(url, obj)`` return the loaded object (the
    same one for in-place adapters, a new one for functional ones); ``values(obj)`` gives
    every array of ``obj`` as numpy; ``leaves`` is the path in the state tree of a dict of
    arrays whose keys the strictness checks remove and add; ``unsupported(obj)`` is what
    ``to_state`` must refuse, with the fragment its message must hold.
    """

    name: str
    make: Callable[[int], Any]
    to_state: Callable[[Any], Any]
    load_state: Callable[[Any, Any, bool], Any]
    save: Callable[[str, Any], Any]
    load: Callable[[str, Any], Any]
    values: Callable[[Any], dict[str, np.ndarray]]
    leaves: tuple[str, ...]
    unsupported: Callable[[Any], tuple[Any, str]]


def in_place(
    load_state: Callable[..., Any], load: Callable[..., Any]
) -> dict[str, Callable[..., Any]]:
    """``Case`` fields for an adapter loading in place: its verbs, returning the object."""

    def loaded_state(obj: Any, state: Any, strict: bool) -> Any:
        load_state(obj, state, strict=strict)
        return obj

    def loaded(url: str, obj: Any) -> Any:
        load(url, obj)
        return obj

    return {"load_state": loaded_state, "load": loaded}


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )


def _stored(case: Case, tmp: Path) -> Any:
    """The state of ``make(0)`` after a trip through storage."""
    checkpointer.save(tmp / "ckpt", case.to_state(case.make(0)))
    return checkpointer.load(tmp / "ckpt")


def _leaf_dict(state: Any, path: tuple[str, ...]) -> dict[str, Any]:
    for part in path:
        state = state[part]
    assert isinstance(state, dict) and len(state) >= 2
    return state


def check_round_trip(case: Case, tmp: Path) -> None:
    source, target = case.make(0), case.make(1)
    assert not _equal(case.values(source), case.values(target))  # the load must do the work
    loaded = case.load_state(target, _stored(case, tmp), True)
    assert _equal(case.values(loaded), case.values(source))


def check_one_liners(case: Case, tmp: Path) -> None:
    source = case.make(0)
    case.save(str(tmp / "one"), source)
    assert _equal(case.values(case.load(str(tmp / "one"), case.make(1))), case.values(source))


def check_missing_key_refused_unless_not_strict(case: Case, tmp: Path) -> None:
    state = _stored(case, tmp)
    leaves = _leaf_dict(state, case.leaves)
    gone = sorted(leaves)[0]
    del leaves[gone]
    target = case.make(1)
    before = case.values(target)
    with pytest.raises(CheckpointError) as err:
        case.load_state(target, state, True)
    assert isinstance(err.value, StateTreeError)
    assert _equal(case.values(target), before)  # refused before anything was loaded
    loaded = case.values(case.load_state(case.make(1), state, False))
    source = case.values(case.make(0))
    changed = [k for k in source if np.array_equal(loaded[k], source[k])]
    assert changed and len(changed) < len(source)  # what is there loaded, the rest kept


def check_unexpected_key_refused_unless_not_strict(case: Case, tmp: Path) -> None:
    state = _stored(case, tmp)
    _leaf_dict(state, case.leaves)["not_in_the_object"] = np.zeros(3, np.float32)
    with pytest.raises(StateTreeError):
        case.load_state(case.make(1), state, True)
    loaded = case.load_state(case.make(1), state, False)
    assert _equal(case.values(loaded), case.values(case.make(0)))


def check_unsupported_leaf_named(case: Case, tmp: Path) -> None:
    bad, fragment = case.unsupported(case.make(0))
    with pytest.raises(StateTreeError, match=fragment):
        case.to_state(bad)


def check_nothing_read_is_mutated(case: Case, tmp: Path) -> None:
    obj = case.make(0)
    before = copy.deepcopy(case.values(obj))
    case.to_state(obj)
    assert _equal(case.values(obj), before)
    stored = _stored(case, tmp)
    kept = copy.deepcopy(stored)
    case.load_state(case.make(1), stored, True)
    flat, kept_flat = checkpointer.tree.flatten(stored), checkpointer.tree.flatten(kept)
    assert flat[0] == kept_flat[0]  # the same structure and plain values
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat[1], kept_flat[1], strict=True))


CHECKS = [
    check_round_trip,
    check_one_liners,
    check_missing_key_refused_unless_not_strict,
    check_unexpected_key_refused_unless_not_strict,
    check_unsupported_leaf_named,
    check_nothing_read_is_mutated,
]
