"""State trees: flatten/unflatten and save/load round trips, refusals, import hygiene."""

from __future__ import annotations

import collections
import inspect
import itertools
import os
import subprocess
import sys
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpointer
import checkpointer.errors as errors
from checkpointer.tree import flatten, path_key, unflatten

SETTINGS = settings(
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ALLOWED_DTYPES = [
    np.dtype(np.bool_),
    np.dtype(np.int8),
    np.dtype(np.int16),
    np.dtype(np.int32),
    np.dtype(np.int64),
    np.dtype(np.uint8),
    np.dtype(np.uint16),
    np.dtype(np.uint32),
    np.dtype(np.uint64),
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
    np.dtype(np.complex64),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(ml_dtypes.float8_e4m3fn),
    np.dtype(ml_dtypes.float8_e5m2),
]
# dtypes numpy can byte-swap (ml_dtypes kinds have a single byte order).
SWAPPABLE = {
    d
    for d in ALLOWED_DTYPES
    if d.itemsize > 1 and d.kind in "iufc" and d.type.__module__ == "numpy"
}

keys = st.lists(
    st.sampled_from(list("ab/~.é漢 \x00_") + ["~1", "~0", "", "val/loss", "__metadata__"]),
    max_size=4,
).map("".join) | st.text(max_size=4)


@st.composite
def arrays(draw: Any) -> np.ndarray:
    """An array of any allow-listed dtype: raw random bytes (every NaN payload), any shape
    (0-d and zero-size included), possibly transposed, strided or big-endian."""
    dtype = draw(st.sampled_from(ALLOWED_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    n = int(np.prod(shape)) if shape else 1
    if dtype.kind == "b":
        arr = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    else:
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        arr = np.frombuffer(raw, dtype=dtype).copy()
    arr = arr.reshape(shape)
    layout = draw(st.sampled_from(["plain", "transposed", "strided", "big-endian"]))
    if layout == "transposed" and arr.ndim >= 2:
        arr = arr.T
    elif layout == "strided" and arr.ndim >= 1:
        arr = np.concatenate([arr, arr], axis=0)[::2]
    elif layout == "big-endian" and dtype in SWAPPABLE:
        arr = arr.astype(dtype.newbyteorder(">"))
    return arr


def _scalar(dtype: np.dtype, raw: bytes) -> np.generic:
    return np.frombuffer(raw, dtype=dtype)[0]


numpy_scalars = st.sampled_from([d for d in ALLOWED_DTYPES if d.kind != "b"]).flatmap(
    lambda d: st.binary(min_size=d.itemsize, max_size=d.itemsize).map(lambda b: _scalar(d, b))
) | st.booleans().map(np.bool_)

leaves = st.one_of(
    arrays(),
    numpy_scalars,
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(float("nan")),
    st.sampled_from([float("inf"), -float("inf"), -0.0]),
    st.text(max_size=8),
    st.binary(max_size=8),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=12,
)


@SETTINGS
@given(tree=trees)
def test_flatten_unflatten_round_trip(tree: Any, same_tree: Any) -> None:
    skeleton, arrs = flatten(tree)
    keys_ = [k for k, _ in arrs]
    assert len(keys_) == len(set(keys_)), "array keys must be unique"
    got = unflatten(skeleton, dict(arrs))
    same_tree(got, tree, "state", False)


_counter = itertools.count()


@SETTINGS
@given(tree=trees)
def test_save_load_round_trip_on_disk(tree: Any, tmp_path: Any, same_tree: Any) -> None:
    url = tmp_path / f"ckpt-{next(_counter)}"
    info = checkpointer.save(url, tree)
    assert info.nbytes > 0
    same_tree(checkpointer.load(url), tree)
    same_tree(checkpointer.load(url, verify=False), tree)


def test_key_order_tuples_and_special_keys(tmp_path: Any, same_tree: Any) -> None:
    tree = {
        "z": 1,
        "a/b": np.arange(3),
        "a~1b": np.arange(4),
        "": {"": (np.ones(2), [None])},
        ".": b"x",
        "é/漢": (1, (2, [3])),
        "~": 2**70,
        "__metadata__": np.arange(2),
    }
    checkpointer.save(tmp_path / "c", tree)
    got = checkpointer.load(tmp_path / "c")
    same_tree(got, tree)
    assert list(got) == ["z", "a/b", "a~1b", "", ".", "é/漢", "~", "__metadata__"]


@pytest.mark.parametrize(
    ("parts", "key"),
    [
        (["a", "b"], "a/b"),
        (["a/b"], "a~1b"),
        (["a~b"], "a~0b"),
        (["~1"], "~01"),
        (["", ""], "/"),
        (["__metadata__"], "~__metadata__"),  # reserved by safetensors
        (["__metadata__", "x"], "__metadata__/x"),
        ([0, "x", 1], "0/x/1"),
    ],
)
def test_path_key_escapes(parts: list[Any], key: str) -> None:
    assert path_key(parts) == key


@pytest.mark.parametrize(
    "scalar",
    [
        np.float64(1.5),  # a subclass of float: must come back as np.float64
        np.float64("nan"),
        np.float32(-0.0),
        np.float16(3.0),
        np.int64(-(2**63)),
        np.uint64(2**64 - 1),
        np.int8(-1),
        np.bool_(True),
        np.complex64(1 - 2j),
        ml_dtypes.bfloat16(1.5),
        ml_dtypes.float8_e4m3fn(2.0),
    ],
    ids=lambda x: type(x).__name__,
)
def test_numpy_scalars_keep_their_type(tmp_path: Any, scalar: Any, same_tree: Any) -> None:
    tree = {"s": scalar, "l": [scalar]}
    same_tree(unflatten(*flatten(tree)[:1], {}), tree)
    checkpointer.save(tmp_path / "c", tree)
    same_tree(checkpointer.load(tmp_path / "c"), tree)


class _Custom:
    pass


_Point = collections.namedtuple("_Point", "x y")
_cyclic_list: list[Any] = [0]
_cyclic_list.append(_cyclic_list)
_cyclic_dict: dict[str, Any] = {}
_cyclic_dict["self"] = _cyclic_dict

UNSUPPORTED = [
    pytest.param(object(), id="object"),
    pytest.param({1, 2}, id="set"),
    pytest.param(frozenset(), id="frozenset"),
    pytest.param(_Custom(), id="custom-class"),
    pytest.param(np.array([1, "a"], dtype=object), id="object-array"),
    pytest.param(np.array(["2020-01-01"], dtype="datetime64[D]"), id="datetime-array"),
    pytest.param(np.array([1], dtype="timedelta64[s]"), id="timedelta-array"),
    pytest.param(np.datetime64("2020-01-01"), id="datetime-scalar"),
    pytest.param(np.array(["ab"]), id="unicode-array"),
    pytest.param(np.zeros(2, dtype=np.complex128), id="complex128-array"),
    pytest.param(np.zeros(2, dtype=[("a", "i4")]), id="structured-array"),
    pytest.param(np.ma.masked_array([1, 2], mask=[0, 1]), id="masked-array"),
    pytest.param(_Point(1, 2), id="namedtuple"),
    pytest.param({1: "a"}, id="int-dict-key"),
    pytest.param({("a",): 1}, id="tuple-dict-key"),
    pytest.param(_cyclic_list, id="cyclic-list"),
    pytest.param(_cyclic_dict, id="cyclic-dict"),
    pytest.param(1 + 2j, id="python-complex"),
    pytest.param(len, id="builtin-function"),
    pytest.param("\ud800", id="lone-surrogate-str"),
    pytest.param({"\udcff": 1}, id="lone-surrogate-key"),
]


@pytest.mark.parametrize("bad", UNSUPPORTED)
def test_unsupported_leaf_names_the_path(bad: Any, tmp_path: Any) -> None:
    tree = {"outer": [0, {"inner": bad}]}
    with pytest.raises(errors.StateTreeError) as exc:
        flatten(tree)
    assert "state['outer'][1]['inner']" in str(exc.value)
    assert isinstance(exc.value, TypeError)
    with pytest.raises(errors.StateTreeError):
        checkpointer.save(tmp_path / "c", tree)
    assert not (tmp_path / "c").exists()
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".ckpt-index")] == []


def test_callable_state_is_called(tmp_path: Any) -> None:
    checkpointer.save(tmp_path / "c", lambda: {"w": np.arange(3)})
    np.testing.assert_array_equal(checkpointer.load(tmp_path / "c")["w"], np.arange(3))


def _run(code: str, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_import_pulls_in_no_framework(tmp_path: Any) -> None:
    code = (
        "import sys, checkpointer, checkpointer.adapters\n"
        "bad = [m for m in ('torch', 'jax', 'keras', 'tensorflow', 'flax', 'lightning',\n"
        "       'pytorch_lightning', 'optax') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    out = _run(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout


def test_top_level_adapters_is_not_importable(tmp_path: Any) -> None:
    bad = _run("import adapters", cwd=tmp_path)
    assert bad.returncode != 0
    assert "ModuleNotFoundError" in bad.stderr
    ok = _run("import checkpointer.adapters; print('OK')", cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr


PUBLIC = {
    "CheckpointManager",
    "CheckpointInfo",
    "Checkpoint",
    "CheckpointWarning",
    "save",
    "load",
    "CheckpointReader",
    "LazyTensor",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "MetricError",
    "StateTreeError",
    "StorageError",
    "__version__",
}
BUILTIN_PARENT = {
    "ConfigurationError": ValueError,
    "StateTreeError": TypeError,
    "MetricError": ValueError,
    "CheckpointNotFoundError": FileNotFoundError,
    "StorageError": OSError,
}


def test_public_names() -> None:
    assert set(checkpointer.__all__) == PUBLIC
    assert checkpointer.open is checkpointer.reader.open  # public, yet not exported by *
    star: dict[str, object] = {}
    exec("from checkpointer import *", star)
    assert "open" not in star
    assert len(checkpointer.__all__) == len(set(checkpointer.__all__))
    for name in checkpointer.__all__:
        assert hasattr(checkpointer, name), name
    for name in ("CheckpointError", "StorageError", "StateTreeError"):
        assert getattr(checkpointer, name) is getattr(errors, name)


def test_error_tree() -> None:
    defined = {
        n for n, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    }
    assert set(errors.__all__) == defined
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.CheckpointError)
        if name in BUILTIN_PARENT:
            assert issubclass(cls, BUILTIN_PARENT[name]), name
    for name in (
        "ChecksumMismatchError",
        "TruncatedFileError",
        "TrailingDataError",
        "ManifestError",
        "HeaderError",
        "HeaderTooLargeError",
        "InvalidOffsetsError",
        "UnsupportedDtypeError",
        "DuplicateKeyError",
        "UnsafePathError",
    ):
        assert issubclass(getattr(errors, name), errors.CorruptCheckpointError), name
    assert issubclass(checkpointer.CheckpointWarning, Warning)


@pytest.mark.parametrize(
    "skeleton",
    [
        "x",
        [],
        ["zz"],
        ["d", "notalist"],
        ["d", [["k"]]],
        ["d", [[1, ["n"]]]],
        ["i", True],
        ["i", "1"],
        ["I", "12a"],
        ["I", "9" * 5000],
        ["a", "missing"],
        ["g", "F32", b"\x00"],
        ["g", "OBJ", b"\x00" * 8],
        ["n", 1],
        ["l", [["n"], ["q"]]],
    ],
)
def test_unflatten_refuses_malformed_skeletons(skeleton: Any) -> None:
    with pytest.raises(errors.ManifestError):
        unflatten(skeleton, {})


def test_unflatten_refuses_deep_skeleton() -> None:
    node: Any = ["n"]
    for _ in range(1000):
        node = ["l", [node]]
    with pytest.raises(errors.ManifestError):
        unflatten(node, {})


def test_flatten_refuses_deep_tree() -> None:
    node: Any = None
    for _ in range(1000):
        node = [node]
    with pytest.raises(errors.StateTreeError):
        flatten(node)
