"""A Keras 3 model (and its optimizer) as a plain state tree and back, and the one-liners.

The tree is ``{"weights": {path: array}, "optimizer": {path: array}}``: every variable of
``model.weights`` and ``model.optimizer.variables`` keyed by its ``variable.path``, in the
model's order. Loading matches by path, else (Keras numbered the layers differently: a
second model in one process has ``dense_1``) by position, every shape checked first.
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

__all__ = ["to_state", "load_state", "save", "load", "global_step"]

_STANDARD_KINDS = "biufc"


def _sync(model: Any) -> None:
    # With JAX, Keras keeps the live training state off the model between epochs; a
    # callback reading or writing variables must attach it first.
    sync = getattr(model, "jax_state_sync", None)
    if callable(sync):
        sync()


def global_step(model: Any) -> int:
    """The optimizer's iteration counter (0 without an optimizer)."""
    optimizer = getattr(model, "optimizer", None)
    return 0 if optimizer is None else int(keras.ops.convert_to_numpy(optimizer.iterations))


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
    """The state tree of a built Keras ``model`` (or layer): ``{"weights": {path: array}}``
    plus ``"optimizer"`` (iteration counter, slots) with ``include_optimizer`` when it has
    one; bfloat16 variables as ``ml_dtypes.bfloat16`` arrays.

    Raises:
        StateTreeError: ``model`` is not a Keras layer or model.

    Example:
        >>> checkpointer.save("ckpts/step100", to_state(model))
    """
    if not isinstance(model, keras.layers.Layer):
        raise StateTreeError(
            f"{type(model).__module__}.{type(model).__qualname__} is not a Keras model or layer")
    _sync(model)
    state: dict[str, Any] = {"weights": _group(model.weights)}
    optimizer = getattr(model, "optimizer", None)
    if include_optimizer and optimizer is not None:
        state["optimizer"] = _group(optimizer.variables)
    return state


def _plan(variables: Sequence[Any], stored: Mapping[str, Any], what: str,
          strict: bool) -> list[tuple[Any, np.ndarray]]:  # fmt: skip
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
            "Build the same architecture before loading (or pass strict=False).")
    plan = []
    for variable, value in pairs:
        array = np.asarray(value)
        if tuple(array.shape) == tuple(variable.shape):
            plan.append((variable, array))
        elif strict:
            raise StateTreeError(
                f"{where}: variable {variable.path!r} has shape {tuple(variable.shape)} "
                f"but the stored array has shape {array.shape}")
    return plan


def _assign(variable: Any, array: np.ndarray) -> None:
    if array.dtype.kind not in _STANDARD_KINDS:
        # ml_dtypes kinds (bfloat16, float8) are not understood by every backend's
        # converter; float32 holds them exactly and Keras casts to the variable's dtype.
        array = array.astype(np.float32)
    variable.assign(keras.ops.cast(array, variable.dtype))


def load_state(model: Any, state: Mapping[str, Any], *, include_optimizer: bool = True,
               strict: bool = True) -> None:  # fmt: skip
    """Assign a tree made by :func:`to_state` to a built ``model`` of the same architecture
    (nothing is rebuilt from stored code or config), its optimizer built first when needed.
    ``include_optimizer``: the optimizer variables too, when the state holds them; ``strict``
    False: assign only the variables whose path and shape match.

    Raises:
        StateTreeError: with ``strict``, the state does not fit (count or shape); nothing
            is assigned then.

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


def save(url: str | os.PathLike[str], model: Any, *, include_optimizer: bool = True,
         metadata: Any = None, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """Save ``to_state(model)`` as the checkpoint ``url`` (:func:`checkpointer.save`, whose
    errors it raises). Example: ``save("ckpts/final", model)``."""
    state = to_state(model, include_optimizer=include_optimizer)
    return checkpointer.save(url, state, metadata=metadata, storage_options=storage_options)


def load(url: str | os.PathLike[str], model: Any, *, include_optimizer: bool = True,
         strict: bool = True, verify: bool = True, storage_options: dict[str, Any] | None = None,
         ) -> None:
    """Read the checkpoint ``url`` into ``model`` in place (:func:`checkpointer.load`, then
    :func:`load_state`, whose errors it raises). Example: ``load("ckpts/final", model)``."""
    state = checkpointer.load(url, verify=verify, storage_options=storage_options)
    load_state(model, state, include_optimizer=include_optimizer, strict=strict)

