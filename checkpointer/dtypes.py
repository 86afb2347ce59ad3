"""The dtype allow-list: safetensors dtype names and the numpy dtypes they map to.

``ml_dtypes`` (bfloat16, float8) is imported on the first lookup of one of its kinds, not
at import: it alone took 1.5 s of a 1.75 s ``import checkpointer`` (``python -X importtime``),
and a state with a bfloat16 array has imported it already. Every name, and every item
size, is known without it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["SAFETENSORS_TO_NUMPY", "ITEMSIZE", "numpy_to_safetensors", "safetensors_to_numpy"]

_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
NATIVE: frozenset[np.dtype] = frozenset(_NUMPY.values())
"""The allow-listed numpy dtypes stored as they are (little-endian, not ml_dtypes')."""

# safetensors name -> (ml_dtypes attribute, item size): known without importing ml_dtypes
_ML: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

ITEMSIZE: dict[str, int] = {**{c: dt.itemsize for c, dt in _NUMPY.items()},
                            **{c: size for c, (_, size) in _ML.items()}}
"""Bytes per element of every allow-listed dtype, by safetensors name (no import needed)."""


class _DtypeTable(Mapping[str, np.dtype]):
    """Safetensors name -> numpy dtype; an ``ml_dtypes`` kind is resolved (and the module
    imported, a lazy import of a heavy optional library) on its first lookup."""

    def __init__(self) -> None:
        self._resolved: dict[str, np.dtype] = dict(_NUMPY)

    def __getitem__(self, code: str) -> np.dtype:
        found = self._resolved.get(code)
        if found is not None:
            return found
        attr, _ = _ML[code]  # KeyError for a name outside the allow-list, as a dict
        dtype: np.dtype = np.dtype(getattr(importlib.import_module("ml_dtypes"), attr))
        self._resolved[code] = dtype
        return dtype

    def __iter__(self) -> Iterator[str]:
        return iter(ITEMSIZE)

    def __len__(self) -> int:
        return len(ITEMSIZE)

    def __contains__(self, code: object) -> bool:
        return code in ITEMSIZE


SAFETENSORS_TO_NUMPY: Mapping[str, np.dtype] = _DtypeTable()

# Keyed by the dtype's name so byte order does not matter: big-endian input is stored
# little-endian. The ml_dtypes kinds' names are theirs, so no import is needed to look up.
_BY_NAME: dict[str, str] = {**{dt.name: code for code, dt in _NUMPY.items()},
                            **{attr: code for code, (attr, _) in _ML.items()}}


@functools.lru_cache(maxsize=256)
def numpy_to_safetensors(dtype: np.dtype) -> str | None:
    """The safetensors name of ``dtype``, or ``None`` when it is not allow-listed."""
    return _BY_NAME.get(dtype.name) if dtype.fields is None else None


def safetensors_to_numpy(code: str) -> np.dtype | None:
    """The numpy dtype of safetensors name ``code``, or ``None`` when it is not allow-listed."""
    return SAFETENSORS_TO_NUMPY.get(code) if isinstance(code, str) else None
