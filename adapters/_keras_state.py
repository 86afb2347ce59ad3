"""Translate a Keras 3 model (and its optimizer) into a plain state tree and back.

The tree is ``{"weights": {path: array}, "optimizer": {path: array}}``: every variable of
``model.weights`` (trainable and not) and of ``model.optimizer.variables`` (the iteration
counter, the learning rate when it is a variable, slot variables) keyed by its Keras 3
``variable.path``, in the model's own order. Loading matches by path first; when the paths
differ only because Keras numbered the layers differently (a second model built in the same
process is ``dense_1`` instead of ``dense``), it matches by position, checking every shape
before anything is assigned.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import ml_dtypes
import numpy as np

import checkpointer
from checkpointer import CheckpointInfo
from checkpointer.errors import StateTreeError
from checkpointer.hints import refuse_checkpoint
from checkpointer.paths import render_path

__all__ = ["to_state", "load_state", "save", "load"]

_STANDARD_KINDS = "biufc"


def _sync(model: Any) -> None:
    # With JAX, Keras keeps the live training state off the model between epochs; a
    # callback reading or writing variables must attach it first.
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()


def _to_numpy(variable: Any) -> np.ndarray:
    array = np.asarray(keras.ops.convert_to_numpy(variable.value))
    if variable.dtype == "bfloat16" and array.dtype != np.dtype(ml_dtypes.bfloat16):
        array = array.astype(ml_dtypes.bfloat16)
    # Own the bytes: the caller may keep the tree while training goes on.
    return np.array(array, copy=True)


def _keys(variables: Sequence[Any]) -> list[str]:
    """Each variable's path; a repeated path (nested models reusing layer names) gets
    ``#1``, ``#2``... in order, so keys stay unique and deterministic."""
    seen: dict[str, int] = {}
    keys = []
    for variable in variables:
        path = str(variable.path)
        n = seen.get(path, 0)
        seen[path] = n + 1
        keys.append(path if n == 0 else f"{path}#{n}")
    return keys


def _group(variables: Sequence[Any]) -> dict[str, np.ndarray]:
    return {key: _to_numpy(v) for key, v in zip(_keys(variables), variables, strict=True)}


def to_state(model: Any, include_optimizer: bool = True) -> dict[str, Any]:
    """Return the state tree of a Keras 3 ``model``: its weights and optimizer variables.

    Args:
        model: a built ``keras.Model`` (or any layer).
        include_optimizer: also store ``model.optimizer.variables`` (iteration counter,
            slots) when the model has an optimizer.

    Returns:
        ``{"weights": {path: array}}`` plus ``"optimizer": {path: array}`` when included.
        bfloat16 variables come back as ``ml_dtypes.bfloat16`` arrays.

    Raises:
        StateTreeError: ``model`` is not a Keras layer or model.

    Example:
        >>> state = to_state(model)
        >>> checkpointer.save("ckpts/step100", state)
    """
    if not isinstance(model, keras.layers.Layer):
        raise StateTreeError(
            f"{type(model).__module__}.{type(model).__qualname__} is not a Keras model or layer"
        )
    _sync(model)
    state: dict[str, Any] = {"weights": _group(model.weights)}
    optimizer = getattr(model, "optimizer", None)
    if include_optimizer and optimizer is not None:
        state["optimizer"] = _group(optimizer.variables)
    return state


def _plan(
    variables: Sequence[Any], stored: Mapping[str, Any], what: str, strict: bool
) -> list[tuple[Any, np.ndarray]]:
    """Pair each variable with its stored array, or raise before anything is assigned
    (not ``strict``: pair by path only, skipping what is missing or of another shape)."""
    where = render_path([what])
    if not isinstance(stored, Mapping):
        raise StateTreeError(f"{where} is {type(stored).__name__}, expected a dict")
    paths = _keys(variables)
    if set(paths) == set(stored):
        pairs = [(v, stored[p]) for v, p in zip(variables, paths, strict=True)]
    elif not strict:
        pairs = [(v, stored[p]) for v, p in zip(variables, paths, strict=True) if p in stored]
    elif len(paths) == len(stored):
        pairs = list(zip(variables, stored.values(), strict=True))
    else:
        missing = sorted(set(paths) - set(stored))[:5]
        unexpected = sorted(set(stored) - set(paths))[:5]
        raise StateTreeError(
            f"{where} holds {len(stored)} variables but the model has {len(paths)}; "
            f"missing e.g. {missing}, unexpected e.g. {unexpected}. "
            "Build the same architecture before loading (or pass strict=False)."
        )
    plan = []
    for variable, value in pairs:
        array = np.asarray(value)
        if tuple(array.shape) == tuple(variable.shape):
            plan.append((variable, array))
        elif strict:
            raise StateTreeError(
                f"{where}: variable {variable.path!r} has shape {tuple(variable.shape)} "
                f"but the stored array has shape {array.shape}"
            )
    return plan


def _assign(variable: Any, array: np.ndarray) -> None:
    if array.dtype.kind not in _STANDARD_KINDS:
        # ml_dtypes kinds (bfloat16, float8) are not understood by every backend's
        # converter; float32 holds them exactly and Keras casts to the variable's dtype.
        array = array.astype(np.float32)
    variable.assign(keras.ops.cast(array, variable.dtype))


def load_state(
    model: Any, state: Mapping[str, Any], *, include_optimizer: bool = True, strict: bool = True
) -> None:
    """Assign a state tree made by :func:`to_state` to a model the caller built.

    Nothing is rebuilt from stored code or config: ``model`` must have the same architecture.
    The optimizer is built first when needed (``optimizer.build(model.trainable_variables)``).

    Args:
        model: a built ``keras.Model`` with the architecture the state was taken from.
        state: the tree, e.g. from ``checkpointer.load(url)``.
        include_optimizer: also restore optimizer variables when the state holds them.
        strict: refuse a state whose variables do not all fit; with ``False`` assign the
            variables whose path and shape match and leave the others as they are.

    Raises:
        StateTreeError: with ``strict``, the state does not fit the model (count or shape);
            nothing is assigned in that case.

    Example:
        >>> load_state(model, checkpointer.load("ckpts/step100"))
    """
    refuse_checkpoint(state)
    if not isinstance(state, Mapping) or "weights" not in state:
        raise StateTreeError("not a Keras state: expected a dict with a 'weights' entry")
    _sync(model)
    plan = _plan(model.weights, state["weights"], "weights", strict)
    optimizer = getattr(model, "optimizer", None)
    if include_optimizer and optimizer is not None and state.get("optimizer") is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        plan += _plan(optimizer.variables, state["optimizer"], "optimizer", strict)
    for variable, array in plan:
        _assign(variable, array)


def save(
    url: str | os.PathLike[str],
    model: Any,
    *,
    include_optimizer: bool = True,
    metadata: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Save ``to_state(model)`` as the checkpoint ``url`` with :func:`checkpointer.save`.

    Raises:
        CheckpointError: any error of :func:`checkpointer.save`.

    Example:
        >>> save("ckpts/final", model)
    """
    state = to_state(model, include_optimizer=include_optimizer)
    return checkpointer.save(url, state, metadata=metadata, storage_options=storage_options)


def load(
    url: str | os.PathLike[str],
    model: Any,
    *,
    include_optimizer: bool = True,
    strict: bool = True,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Read the checkpoint ``url`` with :func:`checkpointer.load` into ``model`` in place.

    Raises:
        StateTreeError: the checkpoint does not fit ``model`` (see :func:`load_state`).
        CheckpointError: any error of :func:`checkpointer.load`.

    Example:
        >>> load("ckpts/final", model)
    """
    state = checkpointer.load(url, verify=verify, storage_options=storage_options)
    load_state(model, state, include_optimizer=include_optimizer, strict=strict)
