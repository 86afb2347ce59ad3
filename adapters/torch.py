"""PyTorch objects to state trees and back: modules, optimizers, schedulers, scalers, RNGs.

``to_state(obj)`` reads anything with ``state_dict()`` (an ``nn.Module``, any
``torch.optim`` optimizer, an LR scheduler, a ``GradScaler``, ...) or a dict of those, and
returns a plain state tree that :func:`checkpointer.save` and :class:`CheckpointManager`
store; ``load_state(obj, state)`` puts it back; ``save(url, obj)`` / ``load(url, obj)`` are
the one-liners over :func:`checkpointer.save` / :func:`checkpointer.load`. Tensors become
numpy views without a copy where memory allows, so save (or snapshot) the tree before
training mutates the model again. Nothing here pickles, and nothing mutates the objects it
reads.

Sharded models (FSDP2 ``fully_shard``, ``DTensor`` parameters) go through the same
functions: each ``DTensor`` becomes a :class:`~checkpointer.sharding.ShardedArray` of the
piece this rank writes, and ``load_state`` puts restored pieces (``restore(template=
template(obj))``, see :mod:`checkpointer.adapters.torch_distributed`) or full arrays back
into the ``DTensor`` parameters, placed as they are.

Example::

    from checkpointer import CheckpointManager
    from checkpointer.adapters.torch import to_state, load_state, rng_state, set_rng_state

    objs = {"model": model, "optimizer": opt, "scheduler": sched}
    mgr = CheckpointManager("ckpts", keep_last=2)
    mgr.epoch_end(epoch, lambda: {**to_state(objs), "rng": rng_state(), "epoch": epoch})
    ...
    state = mgr.restore().state
    load_state(objs, state)
    set_rng_state(state["rng"])
"""

from __future__ import annotations

from ._require import require

with require(__name__, "PyTorch", "torch"):
    import torch

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import checkpointer
from checkpointer import CheckpointInfo
from checkpointer.errors import StateTreeError
from checkpointer.hints import refuse_checkpoint
from checkpointer.paths import render_path

from ._torch_codec import META, DTensor, decode, encode, place
from ._torch_rng import rng_state, set_rng_state

__all__ = ["to_state", "load_state", "save", "load", "rng_state", "set_rng_state", "LoadReport"]

log = logging.getLogger("checkpointer")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state` did not load (all empty after a complete load).

    Attributes:
        missing: keys the object expects but the state lacks.
        unexpected: keys in the state the object does not have.
        mismatched: ``(key, stored_shape, expected_shape)`` for tensors of the wrong shape.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One line per kind of problem, for error and warning messages."""
        parts = []
        if self.missing:
            parts.append(f"missing keys: {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append(
                "shape mismatches: "
                + ", ".join(f"{k} (stored {s}, expected {e})" for k, s, e in self.mismatched)
            )
        return "; ".join(parts)

    def prefixed(self, prefix: str) -> LoadReport:
        """The same report with ``prefix/`` before every key."""
        return LoadReport(
            tuple(f"{prefix}/{k}" for k in self.missing),
            tuple(f"{prefix}/{k}" for k in self.unexpected),
            tuple((f"{prefix}/{k}", s, e) for k, s, e in self.mismatched),
        )

    def __add__(self, other: LoadReport) -> LoadReport:
        return LoadReport(
            self.missing + other.missing,
            self.unexpected + other.unexpected,
            self.mismatched + other.mismatched,
        )


def is_stateful(obj: Any) -> bool:
    """Whether ``obj`` has a ``state_dict()`` method (and is not a class)."""
    return callable(getattr(obj, "state_dict", None)) and not isinstance(obj, type)


def _holds_stateful(obj: Any) -> bool:
    if is_stateful(obj):
        return True
    return isinstance(obj, Mapping) and any(_holds_stateful(v) for v in obj.values())


def _holds_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, Mapping) and any(_holds_tensor(v) for v in obj.values())


def to_state(obj: Any) -> Any:
    """The state tree of ``obj``: anything with ``state_dict()``, or a dict of those.

    A dict mixing objects and plain values (``{"model": m, "epoch": 3}``) keeps the plain
    values as they are; a dict without any object is treated as a raw state dict. A
    ``DTensor`` (FSDP2, tensor parallelism) becomes a ``ShardedArray`` of this rank's piece.

    Raises:
        StateTreeError: a state dict holds a value that is not a tree leaf (the message names
            the key), or a tensor numpy cannot represent.

    Example::

        >>> to_state({"model": torch.nn.Linear(2, 1), "epoch": 3})["model"]["weight"].shape
        (1, 2)
    """
    return _to_state(obj, ())


def _to_state(obj: Any, path: tuple[str, ...]) -> Any:
    if is_stateful(obj):
        return encode(obj.state_dict(), path)
    if isinstance(obj, Mapping) and _holds_stateful(obj):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise StateTreeError(
                    f"{render_path([*path, key])}: keys of a dict of objects must be str"
                )
            out[key] = _to_state(value, (*path, key))
        return out
    return encode(obj, path)


def load_state(obj: Any, state: Any, *, strict: bool = True) -> LoadReport:
    """Load ``state`` (from :func:`to_state`) into ``obj`` in place.

    ``obj`` is what ``to_state`` was given: an object with ``load_state_dict()`` or a dict
    of those (keys of ``state`` that ``obj`` lacks are left for the caller, e.g. ``"epoch"``).

    Args:
        obj: the object(s) to load into.
        state: the state tree.
        strict: raise on missing/unexpected keys and shape mismatches; with ``False`` load
            what fits, log a warning and return what was skipped.

    Returns:
        A :class:`LoadReport` of what was skipped (empty when everything loaded).

    Raises:
        StateTreeError: with ``strict=True``, the keys that are missing, unexpected or of the
            wrong shape; an object rejecting its state (e.g. an optimizer of another shape);
            or a ``Checkpoint`` given where its ``.state`` belongs.

    Example::

        >>> load_state({"model": model, "optimizer": opt}, checkpointer.load("ckpts/step-1"))
        LoadReport(missing=(), unexpected=(), mismatched=())
    """
    refuse_checkpoint(state)  # load_state(obj, mgr.restore()): say ".state"
    report = _load(obj, state, strict, ())
    if report:
        log.warning("load_state skipped what does not fit: %s", report.describe())
    return report


def _load(obj: Any, state: Any, strict: bool, path: tuple[str, ...]) -> LoadReport:
    where = render_path(path)
    if isinstance(obj, torch.nn.Module):
        return _load_module(obj, state, strict, path)
    if is_stateful(obj) and callable(getattr(obj, "load_state_dict", None)):
        placed = place(obj.state_dict(), decode(state, copy=True), path)
        try:
            obj.load_state_dict(placed)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
            raise StateTreeError(
                f"{where}: {type(obj).__name__}.load_state_dict refused the state: {exc}"
            ) from exc
        return LoadReport()
    if isinstance(obj, torch.Tensor) or (isinstance(obj, Mapping) and not _holds_stateful(obj)):
        return _load_tensors(obj, state, strict, path)
    if isinstance(obj, Mapping):
        if not isinstance(state, Mapping):
            raise StateTreeError(f"{where}: expected a dict of states, got {type(state).__name__}")
        report = LoadReport()
        for key, target in obj.items():
            if not (_holds_stateful(target) or _holds_tensor(target)):
                continue
            if key not in state:
                if strict:
                    raise StateTreeError(f"{where}: no state for {key!r} (keys: {sorted(state)})")
                report += LoadReport(missing=(str(key),))
                continue
            report += _load(target, state[key], strict, (*path, key)).prefixed(str(key))
        return report
    raise StateTreeError(
        f"{where}: cannot load into {type(obj).__qualname__}: it has no load_state_dict()"
    )


def _pair_tensors(
    own: Any, stored: Any, key: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> LoadReport:
    """Pair each tensor of the raw state dict ``own`` with its stored tensor; report the rest."""
    if isinstance(own, torch.Tensor):
        if not isinstance(stored, torch.Tensor):
            raise StateTreeError(f"{key or 'state'}: expected a tensor, got {type(stored).__name__}")
        if stored.shape != own.shape:
            return LoadReport(mismatched=((key, tuple(stored.shape), tuple(own.shape)),))
        pairs.append((own, stored))
        return LoadReport()
    if not isinstance(stored, Mapping):
        raise StateTreeError(f"{key or 'state'}: expected a dict, got {type(stored).__name__}")
    report = LoadReport(unexpected=tuple(
        f"{key}/{k}" if key else str(k) for k in stored if k not in own and k != META
    ))  # fmt: skip
    for k, v in own.items():
        sub = f"{key}/{k}" if key else str(k)
        if k not in stored:
            report += LoadReport(missing=(sub,)) if _holds_tensor(v) else LoadReport()
        elif _holds_tensor(v):
            report += _pair_tensors(v, stored[k], sub, pairs)
    return report


def _load_tensors(own: Any, state: Any, strict: bool, path: tuple[str, ...]) -> LoadReport:
    """Copy ``state`` into the tensors of a raw state dict (or one tensor) in place, each
    DTensor's local piece included; with ``strict``, nothing is copied unless all fit."""
    stored = place(own, decode(state, copy=False), path)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    report = _pair_tensors(own, stored, "", pairs)
    if report and strict:
        raise StateTreeError(
            f"{render_path(path)}: state does not fit the state dict: {report.describe()} "
            "(pass strict=False to load what fits)"
        )
    with torch.no_grad():
        for target, value in pairs:
            if DTensor is not None and isinstance(target, DTensor):
                target, value = target.to_local(), value.to_local()
            target.copy_(value)
    return report


def _load_module(
    module: torch.nn.Module, state: Any, strict: bool, path: tuple[str, ...]
) -> LoadReport:
    where = render_path(path)
    if not isinstance(state, Mapping):
        raise StateTreeError(f"{where}: a module state is a dict, got {type(state).__name__}")
    own = module.state_dict()
    stored = place(own, decode(state, copy=False), path)
    lazy = torch.nn.parameter.UninitializedTensorMixin  # type: ignore[attr-defined]
    mismatched = tuple(
        (k, tuple(stored[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in stored
        and isinstance(v, torch.Tensor)
        and not isinstance(v, lazy)
        and isinstance(stored[k], torch.Tensor)
        and stored[k].shape != v.shape
    )
    report = LoadReport(
        missing=tuple(k for k in own if k not in stored),
        unexpected=tuple(k for k in stored if k not in own),
        mismatched=mismatched,
    )
    if report and strict:
        raise StateTreeError(
            f"{where}: state does not fit {type(module).__name__}: {report.describe()} "
            "(pass strict=False to load what fits)"
        )
    skip = {k for k, _, _ in mismatched} | set(report.unexpected)
    fitting = type(stored)((k, v) for k, v in stored.items() if k not in skip)
    if hasattr(stored, "_metadata"):
        fitting._metadata = stored._metadata
    try:
        module.load_state_dict(fitting, strict=not report)
    except RuntimeError as exc:
        raise StateTreeError(f"{where}: {type(module).__name__} refused the state: {exc}") from exc
    return report


def save(
    url: str | os.PathLike[str],
    obj: Any,
    *,
    metadata: Any = None,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Save ``to_state(obj)`` as the checkpoint ``url`` with :func:`checkpointer.save`.

    Raises:
        StateTreeError: ``obj`` holds something that cannot be stored (see :func:`to_state`).
        CheckpointError: any error of :func:`checkpointer.save`.

    Example::

        >>> save("ckpts/final", {"model": model, "optimizer": opt})
    """
    return checkpointer.save(
        url, to_state(obj), metadata=metadata, storage_options=storage_options
    )


def load(
    url: str | os.PathLike[str],
    obj: Any,
    *,
    strict: bool = True,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> LoadReport:
    """Read the checkpoint ``url`` with :func:`checkpointer.load` and load it into ``obj``.

    Returns:
        The :class:`LoadReport` of :func:`load_state`.

    Raises:
        StateTreeError: the checkpoint does not fit ``obj`` (see :func:`load_state`).
        CheckpointError: any error of :func:`checkpointer.load`.

    Example::

        >>> load("ckpts/final", {"model": model, "optimizer": opt})
    """
    state = checkpointer.load(url, verify=verify, storage_options=storage_options)
    return load_state(obj, state, strict=strict)
