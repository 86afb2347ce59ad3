"""Python's, numpy's and torch's random generators as a state tree and back.

Re-exported by :mod:`checkpointer.adapters.torch` (``rng_state`` / ``set_rng_state``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from checkpointer.errors import StateTreeError

from ._torch_codec import array_to_tensor, tensor_to_array

__all__ = ["rng_state", "set_rng_state"]

log = logging.getLogger("checkpointer")


def rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, numpy's global generator and torch's generators.

    Keys: ``"python"``, ``"numpy"``, ``"torch"`` and, where CUDA is available, ``"cuda"``
    (one array per device); Python's 625-word Mersenne Twister state as one uint32 array
    (one leaf, not 625). Feed the result to :func:`set_rng_state`.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": (version, np.array(internal, dtype=np.uint32), gauss),
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
            random.setstate((version, tuple(_as_array(internal, np.int64).tolist()), gauss))
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
