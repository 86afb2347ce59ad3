"""PyTorch objects to state trees and back: modules, optimizers, schedulers, scalers, RNGs.

``to_state(obj)`` reads anything with ``state_dict()`` (an ``nn.Module``, any
``torch.optim`` optimizer, an LR scheduler, a ``GradScaler``, ...) or a dict of those, and
returns a plain state tree that :func:`checkpointer.save` and :class:`CheckpointManager`
store; ``load_state(obj, state)`` puts it back. Tensors become numpy views without a copy
where memory allows, so save (or snapshot) the tree before training mutates the model
again. Nothing here pickles, and nothing mutates the objects it reads.

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

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "checkpointer.adapters.torch needs PyTorch: pip install 'checkpointer-engine[torch]'"
    ) from exc

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from checkpointer.errors import StateTreeError

from ._torch_codec import array_to_tensor, decode, encode, tensor_to_array

__all__ = ["to_state", "load_state", "rng_state", "set_rng_state", "LoadReport"]

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


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and not isinstance(obj, type)


def _holds_stateful(obj: Any) -> bool:
    if _is_stateful(obj):
        return True
    return isinstance(obj, Mapping) and any(_holds_stateful(v) for v in obj.values())


def to_state(obj: Any) -> Any:
    """The state tree of ``obj``: anything with ``state_dict()``, or a dict of those.

    A dict mixing objects and plain values (``{"model": m, "epoch": 3}``) keeps the plain
    values as they are; a dict without any object is treated as a raw state dict.

    Raises:
        StateTreeError: a state dict holds a value that is not a tree leaf (the message names
            the key), or a tensor numpy cannot represent.
    """
    if _is_stateful(obj):
        return encode(obj.state_dict())
    if isinstance(obj, Mapping) and _holds_stateful(obj):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise StateTreeError(f"state[{key!r}]: keys of a dict of objects must be str")
            out[key] = to_state(value)
        return out
    return encode(obj)


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
            wrong shape; or an object rejecting its state (e.g. an optimizer of another shape).
    """
    report = _load(obj, state, strict, "state")
    if report:
        log.warning("load_state skipped what does not fit: %s", report.describe())
    return report


def _load(obj: Any, state: Any, strict: bool, where: str) -> LoadReport:
    if isinstance(obj, torch.nn.Module):
        return _load_module(obj, state, strict, where)
    if _is_stateful(obj) and callable(getattr(obj, "load_state_dict", None)):
        try:
            obj.load_state_dict(decode(state, copy=True))
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
            raise StateTreeError(
                f"{where}: {type(obj).__name__}.load_state_dict refused the state: {exc}"
            ) from exc
        return LoadReport()
    if isinstance(obj, Mapping):
        if not isinstance(state, Mapping):
            raise StateTreeError(f"{where}: expected a dict of states, got {type(state).__name__}")
        report = LoadReport()
        for key, target in obj.items():
            if not _holds_stateful(target):
                continue
            if key not in state:
                if strict:
                    raise StateTreeError(f"{where}: no state for {key!r} (keys: {sorted(state)})")
                report += LoadReport(missing=(str(key),))
                continue
            report += _load(target, state[key], strict, f"{where}[{key!r}]").prefixed(str(key))
        return report
    raise StateTreeError(
        f"{where}: cannot load into {type(obj).__qualname__}: it has no load_state_dict()"
    )


def _load_module(module: torch.nn.Module, state: Any, strict: bool, where: str) -> LoadReport:
    if not isinstance(state, Mapping):
        raise StateTreeError(f"{where}: a module state is a dict, got {type(state).__name__}")
    stored = decode(state, copy=False)
    own = module.state_dict()
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


def rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, numpy's global generator and torch's generators.

    Keys: ``"python"``, ``"numpy"``, ``"torch"`` and, where CUDA is available, ``"cuda"``
    (one array per device). Feed the result to :func:`set_rng_state`.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": tensor_to_array(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [tensor_to_array(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _as_array(value: Any, dtype: Any) -> np.ndarray:
    """A numpy array from an array or a tensor (a Lightning checkpoint holds tensors)."""
    if isinstance(value, torch.Tensor):
        value = tensor_to_array(value)
    return np.array(value, dtype=dtype, copy=True)


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators from :func:`rng_state`'s output; absent entries are left alone.

    Raises:
        StateTreeError: an unknown entry or one of the wrong shape.
    """
    unknown = set(state) - {"python", "numpy", "torch", "cuda"}
    if unknown:
        raise StateTreeError(f"rng state: unknown entries {sorted(unknown)}")
    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in state:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state(
                (str(kind), _as_array(keys, np.uint32), int(pos), int(has_gauss), float(cached))
            )
        if "torch" in state:
            torch.set_rng_state(array_to_tensor(_as_array(state["torch"], np.uint8), copy=True))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise StateTreeError(f"rng state does not fit this generator: {exc}") from exc
    if "cuda" in state:
        if not torch.cuda.is_available():
            log.warning("rng state holds CUDA generators but CUDA is unavailable; ignored")
        else:
            cuda = [array_to_tensor(_as_array(s, np.uint8), copy=True) for s in state["cuda"]]
            if len(cuda) != torch.cuda.device_count():
                log.warning(
                    "rng state holds %d CUDA generators for %d devices; restoring the common ones",
                    len(cuda),
                    torch.cuda.device_count(),
                )
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
