"""Flatten a state tree into a skeleton plus its arrays, and back, reversibly.

The skeleton is plain msgpack-able data: each node is a list whose first item is a tag.
``["d", [[key, node], ...]]`` dict (order kept), ``["l", [...]]`` list, ``["t", [...]]``
tuple, ``["a", key]`` array (stored in safetensors under ``key``), and leaves ``["n"]``
None, ``["b", v]`` bool, ``["i", v]`` int, ``["I", "123"]`` an int beyond 64 bits,
``["f", v]`` float, ``["s", v]`` str, ``["y", v]`` bytes, ``["g", dtype, raw]`` numpy scalar.
Array keys are the leaf's path, each part escaped JSON-pointer style (``~`` -> ``~0``,
``/`` -> ``~1``) and joined with ``/``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .dtypes import NATIVE, numpy_to_safetensors, safetensors_to_numpy
from .errors import ManifestError, StateTreeError
from .gcpause import without_gc
from .hints import refuse_checkpoint
from .paths import render_path
from .sharding import ShardedArray, ShardSpec

__all__ = ["flatten", "unflatten", "path_key", "MAX_DEPTH", "resolve_state", "specs_from_template"]

MAX_DEPTH = 200
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
_BIG_INT = re.compile(r"-?[0-9]{1,4300}")


def path_key(parts: list[str | int]) -> str:
    """The tensor key of the leaf at ``parts``."""
    key = "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)
    # safetensors reserves "__metadata__"; a bare "~" never comes out of the escaping above.
    return "~" + key if key == "__metadata__" else key


def resolve_state(state: Any) -> Any:
    """Call ``state`` when it is a zero-argument callable (a state factory), else return it."""
    return state() if callable(state) and not isinstance(state, (np.ndarray, np.generic)) else state


@without_gc
def flatten(tree: Any) -> tuple[Any, list[tuple[str, np.ndarray]]]:
    """Split ``tree`` into its skeleton and ``[(key, array), ...]`` in tree order.

    Raises:
        StateTreeError: a leaf of an unsupported type, a non-str dict key, a cycle or a tree
            deeper than ``MAX_DEPTH``; the message names the path.
    """
    arrays: list[tuple[str, np.ndarray]] = []
    active: set[int] = set()

    def visit(node: Any, parts: list[str | int]) -> Any:
        if len(parts) > MAX_DEPTH:
            raise StateTreeError(f"{render_path(parts[:5])}...: tree deeper than {MAX_DEPTH} levels")
        if isinstance(node, (dict, list, tuple)):
            if id(node) in active:
                raise StateTreeError(f"{render_path(parts)}: the tree contains a cycle")
            active.add(id(node))
            try:
                return _container(node, parts)
            finally:
                active.discard(id(node))
        return _leaf(node, parts, arrays)

    def _container(node: Any, parts: list[str | int]) -> Any:
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                if not isinstance(k, str):
                    raise StateTreeError(
                        f"{render_path(parts)}: dict key {k!r} is {type(k).__name__}; "
                        "state trees take str keys only"
                    )
                items.append([_utf8(k, parts, "dict key"), visit(v, [*parts, k])])
            return ["d", items]
        tag = "t" if isinstance(node, tuple) else "l"
        if isinstance(node, tuple) and type(node) is not tuple:
            raise StateTreeError(
                f"{render_path(parts)}: {type(node).__name__} (a tuple subclass) cannot be stored; "
                "convert it to a tuple or dict (adapters restore namedtuples from a template)"
            )
        return [tag, [visit(v, [*parts, i]) for i, v in enumerate(node)]]

    skeleton = visit(tree, [])
    return skeleton, arrays


def _utf8(text: str, parts: list[str | int], what: str) -> str:
    """``text`` unchanged, or a StateTreeError when it cannot be stored (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StateTreeError(f"{render_path(parts)}: {what} {text!r:.60} is not valid UTF-8 ({exc.reason})") from None
    return text


def _leaf(node: Any, parts: list[str | int], arrays: list[tuple[str, np.ndarray]]) -> Any:
    if type(node) is np.ndarray and node.dtype in NATIVE:  # the common leaf, checked first
        key = path_key(parts)
        arrays.append((key, node))
        return ["a", key]
    if node is None:
        return ["n"]
    if isinstance(node, bool):
        return ["b", node]
    if isinstance(node, int):
        if _INT_MIN <= node <= _UINT_MAX:
            return ["i", int(node)]
        try:
            return ["I", str(int(node))]
        except ValueError:  # over Python's int-to-str digit limit (4,300 digits)
            raise StateTreeError(f"{render_path(parts)}: an int of more than 4,300 digits cannot be stored") from None
    if isinstance(node, float) and not isinstance(node, np.generic):  # np.float64 is a float
        return ["f", float(node)]
    if isinstance(node, str):
        return ["s", _utf8(node, parts, "string")]
    if isinstance(node, (bytes, bytearray, memoryview)):
        return ["y", bytes(node)]
    if isinstance(node, np.generic):
        code = numpy_to_safetensors(node.dtype)
        if code is None:
            raise StateTreeError(f"{render_path(parts)}: numpy scalar of dtype {node.dtype} is not supported")
        return ["g", code, np.asarray(node).astype(node.dtype.newbyteorder("<")).tobytes()]
    if isinstance(node, ShardedArray):
        key = path_key(parts)
        arrays.append((key, node))  # type: ignore[arg-type]
        return ["a", key]
    if isinstance(node, np.ndarray) and not isinstance(node, np.ma.MaskedArray):
        if numpy_to_safetensors(node.dtype) is None:
            raise StateTreeError(
                f"{render_path(parts)}: array of dtype {node.dtype} is not supported "
                "(bool, ints, floats, complex64, bfloat16 and float8 are)"
            )
        key = path_key(parts)
        arrays.append((key, node))
        return ["a", key]
    refuse_checkpoint(node, render_path(parts))  # restore()'s result passed back: say .state
    raise StateTreeError(
        f"{render_path(parts)}: {type(node).__module__}.{type(node).__qualname__} is not a state "
        "leaf (numpy arrays and scalars, int, float, bool, str, bytes, None); convert it "
        "with an adapter from checkpointer.adapters, nothing is ever pickled"
    )


def unflatten(skeleton: Any, lookup: Callable[[str], np.ndarray] | Mapping[str, np.ndarray]) -> Any:
    """Rebuild the tree from ``skeleton``, taking arrays from ``lookup`` by key.

    Raises:
        ManifestError: the skeleton is malformed (it came from storage, so it is untrusted).
    """
    get = lookup.__getitem__ if isinstance(lookup, Mapping) else lookup

    def bad(why: str) -> ManifestError:
        return ManifestError(f"manifest tree is malformed: {why}")

    def build(node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH + 1:
            raise bad(f"deeper than {MAX_DEPTH} levels")
        if not isinstance(node, list) or not node or not isinstance(node[0], str):
            raise bad(f"node {node!r:.80} is not a tagged list")
        tag, rest = node[0], node[1:]
        if tag == "d" and len(rest) == 1 and isinstance(rest[0], list):
            out = {}
            for item in rest[0]:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                    raise bad(f"dict item {item!r:.80}")
                value = item[1]
                if type(value) is list and len(value) == 2 and value[0] == "a" and type(value[1]) is str:
                    out[item[0]] = _array(value[1], get, bad)  # the common leaf, without a call down
                else:
                    out[item[0]] = build(value, depth + 1)
            return out
        if tag in ("l", "t") and len(rest) == 1 and isinstance(rest[0], list):
            items = [build(v, depth + 1) for v in rest[0]]
            return tuple(items) if tag == "t" else items
        return _build_leaf(tag, rest, get, bad)

    return build(skeleton, 0)


_LEAF_TYPES: dict[str, type | tuple[type, ...]] = {
    "b": bool, "i": int, "f": float, "s": str, "y": bytes, "I": str,
}


def _build_leaf(tag: str, rest: list[Any], get: Callable[[str], np.ndarray],
                bad: Callable[[str], ManifestError]) -> Any:
    if tag == "n" and not rest:
        return None
    if tag in _LEAF_TYPES and len(rest) == 1 and isinstance(rest[0], _LEAF_TYPES[tag]):
        value = rest[0]
        if tag == "i" and isinstance(value, bool):
            raise bad("int leaf holds a bool")
        if tag == "I":
            assert isinstance(value, str)
            if not _BIG_INT.fullmatch(value):
                raise bad(f"big int leaf {value!r:.40}")
            return int(value)
        return value
    if tag == "a" and len(rest) == 1 and isinstance(rest[0], str):
        return _array(rest[0], get, bad)
    if tag == "g" and len(rest) == 2 and isinstance(rest[0], str) and isinstance(rest[1], bytes):
        dtype = safetensors_to_numpy(rest[0])
        if dtype is None or len(rest[1]) != dtype.itemsize:
            raise bad(f"numpy scalar of dtype {rest[0]!r:.20} with {len(rest[1])} bytes")
        return np.frombuffer(rest[1], dtype=dtype)[0]
    raise bad(f"unknown node {[tag, *rest]!r:.80}")


def _array(key: str, get: Callable[[str], np.ndarray], bad: Callable[[str], ManifestError]) -> np.ndarray:
    try:
        return get(key)
    except KeyError:
        raise bad(f"array {key!r} is not among the stored tensors") from None


def specs_from_template(template: Any) -> dict[str, ShardSpec]:
    """Tree key -> :class:`~checkpointer.sharding.ShardSpec` for every ShardSpec or
    ShardedArray leaf of ``template`` (the boxes a process wants back of sharded arrays)."""
    out: dict[str, ShardSpec] = {}

    def walk(node: Any, parts: list[str | int]) -> None:
        if isinstance(node, ShardSpec):
            out[path_key(parts)] = node
        elif isinstance(node, ShardedArray):
            out[path_key(parts)] = ShardSpec(node.shape, node.dtype, tuple(
                (tuple(s.offsets), tuple(s.data.shape)) for s in node.shards))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*parts, k])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, [*parts, i])

    walk(template, [])
    return out
