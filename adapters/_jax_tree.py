"""Walk a JAX pytree into a plain state tree, and a state tree back into a template's pytree.

The public surface is :mod:`checkpointer.adapters.jax`; this module holds the two walks.

Encoding rules (``encode``):

- plain ``dict`` / ``list`` / ``tuple`` keep their type (dict order kept, keys made ``str``);
- every other pytree node (namedtuples, flax ``State``/``FrozenDict``/``Variable``, dataclass
  nodes, custom registered nodes) becomes a ``dict`` keyed by its child key names
  (``GetAttrKey`` -> the attribute, ``DictKey`` -> ``str(key)``, index keys -> ``str(index)``);
- a ``jax.Array`` becomes a numpy array (a copy, so donation or mutation later does not change
  it) of the very same dtype; a typed PRNG key becomes ``{KEY_MARK: impl, "data": key_data}``;
  an array whose dtype the core format cannot hold becomes ``{BITS_MARK: dtype, "bits": u8}``;
- numpy arrays are copied, numpy scalars, Python scalars, ``str``, ``bytes`` and ``None`` stay.

Decoding with a template (``Decoder``) walks the template, so the result has its exact structure;
mismatches are collected (every path) and raised together by the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from checkpointer.dtypes import numpy_to_safetensors
from checkpointer.errors import StateTreeError
from checkpointer.paths import render_path
from checkpointer.sharding import ShardedArray, ShardSpec

from ._jax_sharded import array_to_sharded, from_pieces, is_spread, to_device

KEY_MARK = "__jax_prng_key__"
BITS_MARK = "__jax_array_bits__"
MISSING: Any = object()
_SCALARS = (bool, int, float, complex, str, bytes)

Path = tuple[str | int, ...]  # dict keys and node children by name, sequence items by index


def where(path: Path) -> str:
    """A readable rendering of a state path, e.g. ``state['opt_state'][0]['mu']``."""
    return render_path(path)


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (or an abstract one)."""
    dtype = getattr(x, "dtype", None)
    try:
        return dtype is not None and bool(jnp.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def key_name(entry: Any) -> str:
    """The state-tree key of one pytree key-path entry."""
    if isinstance(entry, tree_util.DictKey):
        return entry.key if isinstance(entry.key, str) else str(entry.key)
    if isinstance(entry, tree_util.GetAttrKey):
        return str(entry.name)
    if isinstance(entry, tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def children(node: Any) -> tuple[list[tuple[str, Any]], Any] | None:
    """``([(name, child), ...], treedef)`` one level down, or ``None`` when ``node`` is a leaf."""
    flat, treedef_ = tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    treedef: Any = treedef_
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None
    return [(key_name(path[0]), child) for path, child in flat], treedef


def _on_cpu(x: jax.Array) -> bool:
    return all(d.platform == "cpu" for d in x.devices())


def prefetch(tree: Any) -> None:
    """Start the device-to-host copy of every accelerator array at once, so they overlap."""
    try:
        leaves = tree_util.tree_leaves(tree)
    except (TypeError, ValueError):  # e.g. dict keys JAX cannot sort: skip the optimization
        return
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
            try:
                if not is_key(leaf) and not _on_cpu(leaf):
                    leaf.copy_to_host_async()
            except RuntimeError:  # e.g. a deleted array: encode() reports it with its path
                pass


def _to_numpy(x: Any) -> np.ndarray:
    # Both branches wait for pending computations. On CPU np.asarray would be a view of the
    # device buffer, so copy; elsewhere it is already a separate host transfer. Either way,
    # donating or deleting ``x`` later leaves the result intact.
    if isinstance(x, jax.Array) and not _on_cpu(x):
        return np.asarray(x)
    return np.array(x, copy=True)


def _encode_array(arr: np.ndarray) -> Any:
    if numpy_to_safetensors(arr.dtype) is not None:
        return arr
    # The format's allow-list lacks this dtype (int4, float8_e4m3fnuz, complex128, ...):
    # store its exact bytes, never a widened copy.
    bits = np.ascontiguousarray(arr).reshape(arr.shape + (1,)).view(np.uint8)
    return {BITS_MARK: arr.dtype.name, "bits": bits}


def encode(node: Any, path: Path = ()) -> Any:
    """Turn the pytree ``node`` into a plain state tree (see the module docstring)."""
    if node is None or isinstance(node, _SCALARS) or isinstance(node, np.generic):
        return node
    if isinstance(node, (ShardedArray, ShardSpec)):  # already a piece (or a template's box)
        return node
    if is_spread(node) and not is_key(node):  # shards on other processes: this one's pieces
        return array_to_sharded(node)
    if isinstance(node, jax.Array):
        try:
            if is_key(node):
                impl = str(jax.random.key_impl(node))
                return {KEY_MARK: impl, "data": _to_numpy(jax.random.key_data(node))}
            return _encode_array(_to_numpy(node))
        except RuntimeError as exc:  # a deleted or donated array
            raise StateTreeError(f"{where(path)}: cannot read this array: {exc}") from exc
    if isinstance(node, np.ndarray):
        return _encode_array(np.array(node, copy=True))
    if type(node) is dict:
        return _encode_items([(k, v) for k, v in node.items()], path, str_keys=True)
    if type(node) in (list, tuple):
        return type(node)(encode(v, (*path, i)) for i, v in enumerate(node))
    found = children(node)
    if found is None:
        raise StateTreeError(
            f"{where(path)}: {type(node).__module__}.{type(node).__qualname__} is neither an "
            "array, a scalar nor a registered pytree node; register it with "
            "jax.tree_util.register_pytree_with_keys or convert it first"
        )
    return _encode_items(found[0], path, str_keys=False)


def _encode_items(items: list[tuple[Any, Any]], path: Path, *, str_keys: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items:
        name = (k if isinstance(k, str) else str(k)) if str_keys else k
        if name in out:
            raise StateTreeError(
                f"{where(path)}: two children map to the key {name!r} (e.g. 1 and '1'); "
                "rename one of them"
            )
        out[name] = encode(v, (*path, name))
    return out


def _describe(x: Any) -> str:
    if isinstance(x, (np.ndarray, np.generic)):
        return f"array {x.dtype}{list(np.shape(x))}"
    return type(x).__name__


# Dtypes that may arrive as raw bits: JAX's own (the state may come from untrusted storage,
# so never an object or structured dtype).
_BITS_DTYPES = frozenset(
    name
    for name in (
        "bool", "int2", "int4", "int8", "int16", "int32", "int64", "uint2", "uint4", "uint8",
        "uint16", "uint32", "uint64", "float16", "float32", "float64", "complex64", "complex128",
        "bfloat16", "float4_e2m1fn", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    )
    if hasattr(jnp, name)
)  # fmt: skip


def decode_bits(s: Mapping[str, Any]) -> np.ndarray:
    """The array stored as ``{BITS_MARK: dtype, "bits": uint8[..., itemsize]}``.

    Raises:
        StateTreeError: an unknown dtype name, or bits that do not fit it.
    """
    name, bits = s[BITS_MARK], s["bits"]
    if name not in _BITS_DTYPES:
        raise StateTreeError(f"stored bits name an unknown dtype {name!r:.40}")
    dtype = np.dtype(getattr(jnp, name))
    if not (isinstance(bits, np.ndarray) and bits.dtype == np.uint8 and bits.ndim >= 1):
        raise StateTreeError(f"stored bits of {dtype} are {_describe(bits)}, not uint8")
    if bits.shape[-1] != dtype.itemsize:
        raise StateTreeError(f"stored bits of shape {list(bits.shape)} do not fit {dtype}")
    out: np.ndarray = np.ascontiguousarray(bits).view(dtype).reshape(bits.shape[:-1])
    return out


def _exact(value: Any, dtype: np.dtype) -> bool:
    try:
        return bool(np.asarray(value, dtype).item() == value)
    except (OverflowError, ValueError, TypeError):
        return False


def _is_bits(s: Any) -> bool:
    return isinstance(s, Mapping) and set(s) == {BITS_MARK, "bits"}


def _is_key_state(s: Any) -> bool:
    return isinstance(s, Mapping) and set(s) == {KEY_MARK, "data"}


def decode_plain(s: Any, path: Path = ()) -> Any:
    """A state tree back to JAX without a template: arrays become jax.Arrays, containers stay.

    Arrays whose dtype JAX would narrow (64-bit types with ``jax_enable_x64`` off) stay numpy.

    Raises:
        StateTreeError: a stored key or bit-array that cannot be rebuilt (names the path).
    """
    if _is_key_state(s):
        data = s["data"]
        impl = s[KEY_MARK]
        ok = isinstance(data, np.ndarray) and data.dtype == np.uint32 and isinstance(impl, str)
        spec = key_spec(impl) if ok else None
        if spec is None or data.shape[data.ndim - len(spec[1]) :] != spec[1]:
            raise StateTreeError(f"{where(path)}: not a valid stored PRNG key ({impl!r:.40})")
        return jax.random.wrap_key_data(jnp.asarray(data), impl=impl)
    if _is_bits(s):
        try:
            return decode_plain(decode_bits(s), path)
        except StateTreeError as exc:
            raise StateTreeError(f"{where(path)}: {exc}") from None
    if isinstance(s, dict):
        return {k: decode_plain(v, (*path, str(k))) for k, v in s.items()}
    if isinstance(s, (list, tuple)):
        return type(s)(decode_plain(v, (*path, i)) for i, v in enumerate(s))
    if isinstance(s, np.ndarray) and jax.dtypes.canonicalize_dtype(s.dtype) == s.dtype:
        return jax.device_put(s)
    return s


class Decoder:
    """Rebuilds a template's structure from a state tree, collecting every mismatch."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.errors: list[str] = []

    def fail(self, path: Path, why: str) -> None:
        """Record one mismatch at ``path``."""
        self.errors.append(f"{where(path)}: {why}")

    def decode(self, t: Any, s: Any, path: Path = ()) -> Any:
        """The pytree shaped like ``t`` holding the values of ``s``."""
        if s is MISSING:
            if self.strict or isinstance(t, jax.ShapeDtypeStruct):
                self.fail(path, "missing from the state")
            return t
        if t is None:
            if s is not None:
                self.fail(path, f"the template has None, the state has {_describe(s)}")
            return None
        if isinstance(t, (jax.Array, jax.ShapeDtypeStruct)) and is_key(t):
            return self._key(t, s, path)
        if isinstance(t, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
            return self._array(t, s, path)
        if isinstance(t, _SCALARS):
            return self._scalar(t, s, path)
        if type(t) is dict:
            items = [(k, k if isinstance(k, str) else str(k), v) for k, v in t.items()]
            values = self._items(items, s, path)
            return t if values is None else dict(zip(t, values, strict=True))
        if type(t) in (list, tuple):
            return self._sequence(t, s, path)
        found = children(t)
        if found is None:
            self.fail(path, f"the template holds an unsupported leaf {type(t).__name__}")
            return t
        kids, treedef = found
        values = self._items([(n, n, v) for n, v in kids], s, path)
        return t if values is None else treedef.unflatten(values)

    def _items(self, items: list[tuple[Any, str, Any]], s: Any, path: Path) -> list[Any] | None:
        if not isinstance(s, Mapping) or _is_key_state(s) or _is_bits(s):
            self.fail(path, f"the template has a node with keys, the state has {_describe(s)}")
            return None
        out = [self.decode(v, s.get(name, MISSING), (*path, name)) for _, name, v in items]
        if self.strict:
            known = {name for _, name, _ in items}
            for extra in s:
                if extra not in known:
                    self.fail((*path, str(extra)), "in the state but not in the template")
        return out

    def _sequence(self, t: list[Any] | tuple[Any, ...], s: Any, path: Path) -> Any:
        if not isinstance(s, (list, tuple)):
            self.fail(path, f"the template has a {type(t).__name__}, the state has {_describe(s)}")
            return t
        out = [
            self.decode(v, s[i] if i < len(s) else MISSING, (*path, i))
            for i, v in enumerate(t)
        ]
        if self.strict and len(s) > len(t):
            self.fail(path, f"the state has {len(s)} items, the template {len(t)}")
        return type(t)(out)

    def _array(self, t: Any, s: Any, path: Path) -> Any:
        if isinstance(s, ShardedArray):
            return self._pieces(t, s, path)
        if _is_bits(s):
            try:
                s = decode_bits(s)
            except StateTreeError as exc:
                self.fail(path, str(exc))
                return t
        shape, dtype = tuple(np.shape(t)), np.dtype(t.dtype)
        if isinstance(s, (bool, int, float, complex)) and not shape and _exact(s, dtype):
            s = np.asarray(s, dtype)  # e.g. a Python step restored into a jax.eval_shape template
        if not isinstance(s, (np.ndarray, np.generic)):
            self.fail(path, f"the template has an array, the state has {_describe(s)}")
            return t
        arr = np.asarray(s)
        if arr.shape != shape or arr.dtype != dtype:
            self.fail(path, f"the state has {_describe(arr)}, the template {dtype}{list(shape)}")
            return t
        if isinstance(t, np.generic):
            return arr[()]
        if isinstance(t, np.ndarray):
            return arr
        return to_device(arr, t)

    def _pieces(self, t: Any, s: ShardedArray, path: Path) -> Any:
        """A template leaf from pieces restored through ``template(tree)``."""
        if len(s.shards) == 1 and s.shards[0].data.shape == s.shape:
            return self._array(t, s.shards[0].data, path)  # one piece: the whole array
        if getattr(t, "sharding", None) is None:
            self.fail(path, "the state has sharded pieces, the template no sharded array")
            return t
        built = from_pieces(t, s)
        if isinstance(built, str):
            self.fail(path, built)
            return t
        return built

    def _scalar(self, t: Any, s: Any, path: Path) -> Any:
        if isinstance(s, (np.generic, np.ndarray)) and np.ndim(s) == 0:
            s = s.item()
        # bool is an int subclass: compare the exact kinds, allowing an int for a float.
        ok = type(s) is type(t) or (isinstance(t, float) and type(s) is int)
        if not ok:
            self.fail(path, f"the template has {type(t).__name__}, the state has {_describe(s)}")
            return t
        return type(t)(s)

    def _key(self, t: Any, s: Any, path: Path) -> Any:
        if not _is_key_state(s):
            self.fail(path, f"the template has a PRNG key, the state has {_describe(s)}")
            return t
        data = np.asarray(s["data"])
        want = tuple(jax.eval_shape(jax.random.key_data, t).shape)
        impl = s[KEY_MARK]
        spec = key_spec(impl) if isinstance(impl, str) else None
        if spec is None or spec[0] != t.dtype or data.shape != want or data.dtype != np.uint32:
            self.fail(
                path,
                f"the state has a {s[KEY_MARK]!s} key with data {_describe(data)}, "
                f"the template a {t.dtype} key with data uint32{list(want)}",
            )
            return t
        key = jax.random.wrap_key_data(jnp.asarray(data), impl=impl)
        return to_device(key, t)


@functools.cache
def key_spec(impl: str) -> tuple[Any, tuple[int, ...]] | None:
    """``(key dtype, key data shape)`` of the PRNG implementation ``impl``; ``None`` if unknown."""
    try:
        key = jax.eval_shape(functools.partial(jax.random.key, 0, impl=impl))
    except (ValueError, TypeError, KeyError):
        return None
    return key.dtype, tuple(jax.eval_shape(jax.random.key_data, key).shape)
