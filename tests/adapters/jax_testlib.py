"""Helpers shared by the JAX adapter tests (imported by path, not collected)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

JAX_DTYPES = [
    "bool", "int8", "int16", "int32", "uint8", "uint16", "uint32", "float16", "float32",
    "bfloat16", "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz",
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e3m4", "float8_e4m3", "float8_e8m0fnu",
    "float4_e2m1fn", "int4", "uint4", "int2", "uint2",
]  # fmt: skip


def leaves_equal(a: Any, b: Any) -> bool:
    """Same structure, same leaf types and dtypes, same bytes (NaN-safe)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    if ta != tb:
        return False
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None) or np.float32, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if type(x) is not type(y):
            return False
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            xa, ya = np.asarray(x), np.asarray(y)
            if xa.dtype != ya.dtype or xa.shape != ya.shape or xa.tobytes() != ya.tobytes():
                return False
        elif x != y:
            return False
    return True


def sample(dtype: str, shape: tuple[int, ...] = (2, 3)) -> jax.Array:
    values = np.linspace(-1.5, 1.5, int(np.prod(shape))).reshape(shape)
    if dtype.startswith(("uint", "float8_e8m0")):
        values = np.abs(values)
    return jnp.asarray(values).astype(dtype)
