"""Unit tests of the JAX adapter's to_state/from_state (jax, optax and numpy only, no storage)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

from checkpointer.adapters import jax as cj  # noqa: E402
from checkpointer.errors import CheckpointError, StateTreeError  # noqa: E402
from checkpointer.tree import flatten, unflatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # works whether or not tests/ is a package
from jax_testlib import JAX_DTYPES, leaves_equal, sample  # noqa: E402


@pytest.mark.parametrize("dtype", JAX_DTYPES)
def test_every_dtype_round_trips_bit_exact_never_widened(dtype: str) -> None:
    tree = {"x": sample(dtype), "scalar": sample(dtype, ())}
    state = cj.to_state(tree)
    stored = state["x"]
    if isinstance(stored, dict):  # dtype outside the format's allow-list: exact bytes
        assert stored[cj.BITS_MARK] == jnp.dtype(dtype).name
        assert stored["bits"].dtype == np.uint8
    else:
        assert stored.dtype == jnp.dtype(dtype) and isinstance(stored, np.ndarray)
    back = cj.from_state(tree, state)
    assert leaves_equal(back, tree)
    assert back["x"].dtype == jnp.dtype(dtype)
    assert cj.from_state(None, state)["x"].dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("dtype", ["int64", "uint64", "float64", "complex128", "bfloat16"])
def test_numpy_leaves_and_scalars_stay_numpy(dtype: str) -> None:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    arr = np.arange(6).reshape(2, 3).astype(jnp.dtype(dtype))
    tree = {"arr": arr, "g": arr.reshape(-1)[3], "py": [1, 2.5, True, "s", b"b", None]}
    back = cj.from_state(tree, cj.to_state(tree))
    assert leaves_equal(back, tree)
    assert isinstance(back["arr"], np.ndarray) and back["arr"].dtype == arr.dtype
    assert isinstance(back["g"], np.generic) and back["py"] == tree["py"]
    # Template-less: 64-bit arrays JAX would narrow (x64 off) stay numpy, others become jax.
    plain = cj.from_state(None, cj.to_state(tree))
    assert plain["arr"].dtype == arr.dtype


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@pytest.mark.parametrize("shape", [(), (3,)])
def test_typed_keys_restore_as_typed_keys(impl: str, shape: tuple[int, ...]) -> None:
    key = jax.random.key(7, impl=impl)
    key = jax.random.split(key, shape[0]) if shape else key
    state = cj.to_state({"key": key})
    assert state["key"][cj.KEY_MARK] == impl
    np.testing.assert_array_equal(state["key"]["data"], jax.random.key_data(key))
    template = {"key": jax.random.key(0, impl=impl)}
    if shape:
        template = {"key": jax.random.split(template["key"], shape[0])}
    for back in (cj.from_state(template, state), cj.from_state(None, state)):
        assert jax.dtypes.issubdtype(back["key"].dtype, jax.dtypes.prng_key)
        assert jax.random.key_impl(back["key"]) == jax.random.key_impl(key)
        np.testing.assert_array_equal(jax.random.key_data(back["key"]), jax.random.key_data(key))
        one, original = (back["key"][-1], key[-1]) if shape else (back["key"], key)
        np.testing.assert_array_equal(jax.random.normal(one), jax.random.normal(original))


def test_raw_uint32_keys_are_plain_arrays() -> None:
    raw = jax.random.PRNGKey(3)
    state = cj.to_state({"rng": raw})
    assert state["rng"].dtype == np.uint32
    back = cj.from_state({"rng": jax.random.PRNGKey(0)}, state)["rng"]
    np.testing.assert_array_equal(jax.random.uniform(back), jax.random.uniform(raw))


def test_key_impl_mismatch_is_an_error() -> None:
    state = cj.to_state({"key": jax.random.key(1, impl="rbg")})
    with pytest.raises(StateTreeError, match=r"state\['key'\]: the state has a rbg key"):
        cj.from_state({"key": jax.random.key(0)}, state)


def optax_tree() -> dict[str, Any]:
    params = {"dense": {"kernel": sample("bfloat16"), "bias": jnp.zeros(3)}, "scale": jnp.ones(())}
    sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 50)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(sched, weight_decay=1e-2),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    )
    return {"params": params, "opt_state": tx.init(params), "step": 4, "key": jax.random.key(0)}


def test_namedtuple_optimizer_states_come_back_as_namedtuples() -> None:
    tree = optax_tree()
    state = cj.to_state(tree)
    adam = state["opt_state"][1][0]
    assert (
        set(adam) == {"count", "mu", "nu"}
        and adam["mu"]["dense"]["kernel"].dtype.name == "bfloat16"
    )
    back = cj.from_state(tree, state)
    assert leaves_equal(back, tree)
    assert type(back["opt_state"][1][0]) is type(tree["opt_state"][1][0])
    assert back["opt_state"][1][0]._fields == ("count", "mu", "nu")


def test_plain_containers_keep_type_and_order_and_none() -> None:
    tree = {"z": (jnp.ones(1), [None, 2]), "a": [], "m": {}, 3: "int key"}
    state = cj.to_state(tree)
    assert list(state) == ["z", "a", "m", "3"] and isinstance(state["z"], tuple)
    back = cj.from_state(tree, state)
    assert list(back) == ["z", "a", "m", 3] and back["z"][1] == [None, 2]


@dataclasses.dataclass
class Node:
    w: jax.Array
    b: Any


jax.tree_util.register_dataclass(Node, data_fields=["w", "b"], meta_fields=[])


class Pair:
    """A custom node registered without keys (children come back by index)."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(Pair, lambda p: ((p.a, p.b), None), lambda _, c: Pair(*c))


class Hyper(NamedTuple):
    lr: float
    key: Any


def test_custom_nodes_round_trip() -> None:
    tree = [Node(jnp.arange(3.0), Pair(jnp.ones(2, jnp.bfloat16), None)), Hyper(0.1, None)]
    state = cj.to_state(tree)
    assert set(state[0]) == {"w", "b"} and set(state[0]["b"]) == {"0", "1"}
    assert state[1] == {"lr": 0.1, "key": None}
    back = cj.from_state(tree, state)
    assert isinstance(back[0], Node) and isinstance(back[0].b, Pair) and back[1] == tree[1]
    assert leaves_equal(back[0].w, tree[0].w) and leaves_equal(back[0].b.a, tree[0].b.a)


def test_mismatch_lists_every_path() -> None:
    tree = optax_tree()
    state = cj.to_state(tree)
    state["params"]["dense"]["kernel"] = state["params"]["dense"]["kernel"].astype(np.float32)
    state["params"]["scale"] = np.ones((2,), np.float32)
    del state["opt_state"][1][0]["nu"]
    state["extra"] = 1
    with pytest.raises(StateTreeError) as err:
        cj.from_state(tree, state)
    text = str(err.value)
    assert isinstance(err.value, CheckpointError)
    for where in ("state['params']['dense']['kernel']", "state['params']['scale']",
                  "state['opt_state'][1][0]['nu']", "state['extra']"):
        assert f"  {where}: " in text
    assert "bfloat16[2, 3]" in text and "4 path(s)" in text


def test_non_strict_tolerates_missing_and_extra_but_not_shape() -> None:
    tree = {"a": jnp.ones(2), "b": jnp.zeros(2)}
    back = cj.from_state(tree, {"a": np.full(2, 5.0, np.float32), "c": 1}, strict=False)
    np.testing.assert_array_equal(back["a"], [5, 5])
    assert back["b"] is tree["b"]
    with pytest.raises(StateTreeError, match=r"state\['a'\]: the state has array float32"):
        cj.from_state(tree, {"a": np.ones(3, np.float32)}, strict=False)


@pytest.mark.parametrize(
    ("template", "state", "message"),
    [
        ({"a": jnp.ones(2)}, {"a": [1, 2]}, "template has an array, the state has list"),
        ([jnp.ones(2)], {"0": np.ones(2)}, "template has a list, the state has dict"),
        ({"a": None}, {"a": np.ones(2)}, "template has None"),
        ({"a": 1}, {"a": 1.5}, "template has int, the state has float"),
        ((1, 2), (1,), r"state\[1\]: missing from the state"),
        ({"k": jax.random.key(0)}, {"k": np.zeros(2, np.uint32)}, "template has a PRNG key"),
    ],
)
def test_kind_mismatches(template: Any, state: Any, message: str) -> None:
    with pytest.raises(StateTreeError, match=message):
        cj.from_state(template, state)


def test_unsupported_leaf_and_key_collision_name_the_path() -> None:
    with pytest.raises(StateTreeError, match=r"state\['params'\]\['w'\]: .*object"):
        cj.to_state({"params": {"w": object()}})
    with pytest.raises(StateTreeError, match="two children map to the key '1'"):
        cj.to_state({1: 0, "1": 0})
    gone = jnp.ones(2)
    gone.delete()
    with pytest.raises(StateTreeError, match=r"state\['opt'\]\[0\]: cannot read this array.*deleted"):
        cj.to_state({"opt": [gone]})


def test_abstract_template_from_eval_shape() -> None:
    tree = optax_tree()
    abstract = jax.eval_shape(lambda: tree)
    back = cj.from_state(abstract, cj.to_state(tree))
    assert back["step"] == 4 and back["step"].dtype == jnp.int32  # eval_shape made it an array
    back["step"] = tree["step"]
    assert leaves_equal(back, tree)


def test_sharding_and_weak_type_follow_the_template() -> None:
    device = jax.devices()[-1]
    template = {"w": jax.device_put(jnp.zeros(4), device), "lr": jnp.asarray(0.5)}
    assert template["lr"].weak_type
    back = cj.from_state(template, cj.to_state({"w": jnp.arange(4.0), "lr": jnp.asarray(0.1)}))
    assert back["w"].sharding == template["w"].sharding and back["w"].committed
    assert back["lr"].weak_type and not back["w"].weak_type


def test_to_state_materializes_before_donation_and_mutation() -> None:
    x = jnp.arange(512 * 512, dtype=jnp.float32).reshape(512, 512)
    y = jax.jit(lambda a: (a @ a) / 1e9)(x)  # dispatched asynchronously
    expected = np.asarray(jax.jit(lambda a: (a @ a) / 1e9)(x)).copy()
    arr = np.ones(3)
    state = cj.to_state({"y": y, "arr": arr})
    jax.jit(lambda a: a * 0.0, donate_argnums=0)(y)
    # The donation went through: the state holds no reference into y's (now reused) buffer.
    assert y.is_deleted()
    arr[:] = 7.0
    np.testing.assert_array_equal(state["y"], expected)
    np.testing.assert_array_equal(state["arr"], np.ones(3))


def test_inputs_are_not_mutated() -> None:
    tree = optax_tree()
    snapshot = jax.tree_util.tree_map(lambda v: np.array(v, copy=True), tree["params"])
    cj.from_state(tree, cj.to_state(tree))
    assert leaves_equal(jax.tree_util.tree_map(np.asarray, tree["params"]), snapshot)


def test_missing_jax_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("checkpointer.adapters.jax", "checkpointer.adapters._jax_tree"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(ImportError, match=r"pip install 'checkpointer-engine\[jax\]'"):
        importlib.import_module("checkpointer.adapters.jax")


@pytest.mark.parametrize(
    "stored",
    [
        {cj.KEY_MARK: "no-such-impl", "data": np.zeros(2, np.uint32)},
        {cj.KEY_MARK: "threefry2x32", "data": np.zeros(3, np.uint32)},
        {cj.BITS_MARK: "object", "bits": np.zeros((2, 8), np.uint8)},
        {cj.BITS_MARK: "int4", "bits": np.zeros((2, 2), np.uint8)},
        {cj.BITS_MARK: "int4", "bits": np.zeros((2, 1), np.float32)},
    ],
)
def test_malformed_stored_markers_are_state_tree_errors(stored: dict[str, Any]) -> None:
    with pytest.raises(StateTreeError, match=r"^state\['x'\]: "):
        cj.from_state(None, {"x": stored})
    template = {"x": jnp.zeros(2, jnp.int4) if cj.BITS_MARK in stored else jax.random.key(0)}
    with pytest.raises(StateTreeError, match=r"\n  state\['x'\]: "):
        cj.from_state(template, {"x": stored})


def _array(dtype: str, shape: list[int], seed: int) -> jax.Array:
    values = np.random.default_rng(seed).uniform(-3, 3, size=shape)
    return jnp.asarray(np.abs(values) if dtype.startswith("u") else values).astype(dtype)


_leaves = (
    st.builds(
        _array,
        st.sampled_from(["float32", "bfloat16", "float16", "int8", "uint32", "bool", "int4",
                         "float8_e4m3fn", "float8_e5m2fnuz", "complex64"]),
        st.lists(st.integers(0, 3), max_size=3),
        st.integers(0, 2**32 - 1),
    )
    | st.builds(lambda seed: jax.random.key(seed), st.integers(0, 2**31 - 1))
    | st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(max_size=4)
    | st.floats(allow_nan=False, width=64)
)  # fmt: skip
_trees = st.recursive(
    _leaves,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.lists(kids, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), kids, max_size=3)
        | st.builds(Hyper, kids, kids)
    ),
    max_leaves=8,
)


@settings(max_examples=40, deadline=None)
@given(_trees)
def test_round_trip_through_the_core_tree_format(tree: Any) -> None:
    skeleton, arrays = flatten(cj.to_state(tree))  # what storage writes: a valid state tree
    back = cj.from_state(tree, unflatten(skeleton, dict(arrays)))
    assert leaves_equal(back, tree)
