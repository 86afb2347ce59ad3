"""Shared fixtures of the core tests: bit-exact tree comparison and unique store URLs."""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest


def _le(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def assert_same_tree(got: Any, want: Any, where: str = "state", stored: bool = True) -> None:
    """``got`` equals ``want`` bit-exactly: types, container kinds, key order, array bytes.

    ``stored``: ``got`` came back from storage, so its arrays must be little-endian.
    """
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got)} is not an array"
        if stored:
            assert got.dtype == _le(want.dtype), f"{where}: dtype {got.dtype} != {want.dtype}"
        assert _le(got.dtype) == _le(want.dtype), f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        expect = np.ascontiguousarray(want.astype(_le(want.dtype))).tobytes()
        assert np.ascontiguousarray(got.astype(_le(got.dtype))).tobytes() == expect, (
            f"{where}: bytes differ"
        )
        return
    if isinstance(want, np.generic):
        assert type(got) is type(want), f"{where}: {type(got)} is not {type(want)}"
        assert got.dtype == want.dtype
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), f"{where}: bytes differ"
        return
    assert type(got) is type(want), f"{where}: {type(got).__name__} is not {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys or their order differ"
        for k in want:
            assert_same_tree(got[k], want[k], f"{where}[{k!r}]", stored)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length differs"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_tree(g, w, f"{where}[{i}]", stored)
    elif isinstance(want, float):
        if math.isnan(want):
            assert struct.pack("<d", got) == struct.pack("<d", want), f"{where}: NaN payload"
        else:
            assert got == want
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture
def same_tree() -> Callable[[Any, Any], None]:
    """The bit-exact comparison as a fixture (test modules cannot import conftest)."""
    return assert_same_tree


@pytest.fixture
def memory_url() -> str:
    """A fresh memory:// directory URL, unique per test."""
    return f"memory://core-{uuid.uuid4().hex}"
