"""The dtype allow-list: safetensors dtype names and the numpy dtypes they map to."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

__all__ = ["SAFETENSORS_TO_NUMPY", "numpy_to_safetensors", "safetensors_to_numpy"]

SAFETENSORS_TO_NUMPY: dict[str, np.dtype] = {
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
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

# Keyed by (kind, itemsize, name) so byte order does not matter: big-endian input is
# stored little-endian.
_BY_NAME: dict[str, str] = {dt.name: code for code, dt in SAFETENSORS_TO_NUMPY.items()}


@functools.lru_cache(maxsize=256)
def numpy_to_safetensors(dtype: np.dtype) -> str | None:
    """The safetensors name of ``dtype``, or ``None`` when it is not allow-listed."""
    return _BY_NAME.get(dtype.name) if dtype.fields is None else None


def safetensors_to_numpy(code: str) -> np.dtype | None:
    """The numpy dtype of safetensors name ``code``, or ``None`` when it is not allow-listed."""
    return SAFETENSORS_TO_NUMPY.get(code) if isinstance(code, str) else None
