"""Convert torch state dicts to plain state trees and back, reversibly, without pickle.

Shared by :mod:`checkpointer.adapters.torch` and :mod:`checkpointer.adapters.lightning`.

A torch state dict is almost a state tree already. Four things are not, and each gets a
reversible encoding:

- a ``DTensor`` (FSDP2 ``fully_shard`` parameters, tensor parallelism) becomes a
  :class:`~checkpointer.sharding.ShardedArray` of the piece this rank writes (replicas once);
- tensors become numpy arrays (views, no copy, where memory allows); bfloat16 and float8
  travel bit-for-bit through an integer view, never through float32;
- dict keys that are ints (an optimizer's per-parameter ``state``) become str keys, and the
  dict records which ones were ints under the reserved key ``"__torch__"``;
- a tensor that shares its memory with an earlier one (tied weights) is stored once: its
  place holds ``None`` and the root's ``"__torch__"`` entry records ``[alias_path,
  target_path]`` so that decoding puts the same tensor in both places.

A ``"__torch__"`` entry appears only where needed, so a plain model encodes to exactly
``{name: array}``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import torch

from checkpointer.errors import StateTreeError
from checkpointer.paths import render_path
from checkpointer.sharding import Shard, ShardedArray

try:  # a torch built without distributed support has no DTensor (and no sharded state)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None

__all__ = [
    "META",
    "DTensor",
    "encode",
    "decode",
    "tensor_to_array",
    "array_to_tensor",
    "local_box",
    "dtensor_to_sharded",
    "place",
    "where",
]

META = "__torch__"

# torch dtypes numpy lacks: (same-size integer torch dtype, numpy dtype to view it as).
_VIA_INT: dict[torch.dtype, tuple[torch.dtype, np.dtype]] = {
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
}
for _tname, _nname in (
    ("float8_e4m3fnuz", "float8_e4m3fnuz"),
    ("float8_e5m2fnuz", "float8_e5m2fnuz"),
):
    if hasattr(torch, _tname) and hasattr(ml_dtypes, _nname):
        _VIA_INT[getattr(torch, _tname)] = (torch.uint8, np.dtype(getattr(ml_dtypes, _nname)))
_FROM_NUMPY: dict[np.dtype, tuple[np.dtype, torch.dtype]] = {
    ndt: (np.dtype(np.int16 if idt == torch.int16 else np.uint8), tdt)
    for tdt, (idt, ndt) in _VIA_INT.items()
}

_PLAIN = (type(None), bool, int, float, str, bytes, np.generic)


def where(path: tuple[Any, ...] | list[Any]) -> str:
    """A readable location such as ``state['state'][0]['exp_avg']``."""
    return render_path(path)


def tensor_to_array(tensor: torch.Tensor, path: tuple[Any, ...] = ()) -> np.ndarray:
    """A numpy view of ``tensor`` (a copy only when it lives off the CPU or has a conj/neg bit).

    Raises:
        StateTreeError: sparse, quantized or meta tensors, and dtypes numpy cannot hold.
    """
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        raise StateTreeError(
            f"{where(path)}: a {tensor.layout} {tensor.dtype} tensor on {tensor.device} cannot be "
            "stored; convert it to a dense, non-quantized tensor first"
        )
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg()
    via = _VIA_INT.get(t.dtype)
    try:
        if via is not None:
            return t.view(via[0]).numpy().view(via[1])
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise StateTreeError(
            f"{where(path)}: tensor of dtype {t.dtype} cannot be stored: {exc}"
        ) from exc


def array_to_tensor(array: np.ndarray, *, copy: bool) -> torch.Tensor:
    """A CPU tensor over ``array`` (shared memory unless ``copy``); bfloat16/float8 bit-exact."""
    via = _FROM_NUMPY.get(array.dtype)
    if via is not None:
        array = array.view(via[0])
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if copy:
        array = np.array(array, copy=True, order="K")
    if array.size == 0:  # numpy gives some empty arrays zero strides, which torch views reject
        tensor = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(1, array.dtype)).dtype)
        return tensor.view(via[1]) if via is not None else tensor
    with warnings.catch_warnings():
        # A read-only array (a memory-mapped checkpoint) is fine when the tensor is only read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.view(via[1]) if via is not None else tensor


def local_box(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, shape)`` of the box of the global array this rank holds in DTensor ``t``."""
    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offsets), tuple(int(n) for n in shape)


def _writes(t: Any) -> bool:
    """Replicated pieces are written once: by the rank at coordinate 0 of each replicated dim."""
    coord = t.device_mesh.get_coordinate()
    if coord is None:
        return False
    return all(c == 0 for c, p in zip(coord, t.placements, strict=True) if not p.is_shard())


def dtensor_to_sharded(t: Any, path: tuple[Any, ...] = ()) -> ShardedArray:
    """The piece of DTensor ``t`` this rank writes, as a framework-free :class:`ShardedArray`
    (no piece on a rank holding a replica another rank writes)."""
    offsets, shape = local_box(t)
    local = tensor_to_array(t.to_local(), path)
    shards = (Shard(offsets, local.reshape(shape)),) if _writes(t) else ()
    return ShardedArray(tuple(t.shape), local.dtype, shards)


class _Encoder:
    """One root's encoding: tracks tensor memory seen so far to detect aliases."""

    def __init__(self, prefix: tuple[Any, ...] = ()) -> None:
        self.prefix = prefix  # where the root sits, for messages only (aliases are root-relative)
        self.seen: dict[tuple[Any, ...], list[Any]] = {}
        self.aliases: list[list[list[Any]]] = []

    def visit(self, node: Any, path: tuple[Any, ...]) -> Any:
        # ``path`` holds the original keys (ints stay ints): alias records use it.
        if DTensor is not None and isinstance(node, DTensor):  # before the plain tensor check
            return dtensor_to_sharded(node, (*self.prefix, *path))
        if isinstance(node, torch.Tensor):
            return self._tensor(node, path)
        if isinstance(node, (np.ndarray, ShardedArray)):
            return node
        if isinstance(node, _PLAIN):
            return node
        if isinstance(node, Mapping):
            return self._mapping(node, path)
        if isinstance(node, (list, tuple)):
            items = [self.visit(v, (*path, i)) for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        raise StateTreeError(
            f"{where((*self.prefix, *path))}: {type(node).__module__}.{type(node).__qualname__} is not a state "
            "leaf (tensors, numpy arrays, int, float, bool, str, bytes, None, dict, list, "
            "tuple); nothing is ever pickled, so convert it to plain values or drop it"
        )

    def _tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> np.ndarray | None:
        if tensor.numel() > 0 and tensor.layout == torch.strided and not tensor.is_meta:
            ident = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
            )
            target = self.seen.get(ident)
            if target is not None:
                self.aliases.append([list(path), target])
                return None
            self.seen[ident] = list(path)
        return tensor_to_array(tensor, (*self.prefix, *path))

    def _mapping(self, node: Mapping[Any, Any], path: tuple[Any, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        int_keys: list[str] = []
        for key, value in node.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise StateTreeError(
                    f"{where((*self.prefix, *path))}: dict key {key!r} of type {type(key).__name__} cannot be "
                    "stored (str and int keys can)"
                )
            skey = str(key) if isinstance(key, int) else key
            if skey == META or skey in out:
                raise StateTreeError(
                    f"{where((*self.prefix, *path))}: key {key!r} collides with "
                    + ("the adapter's reserved key" if skey == META else f"the key {skey!r}")
                )
            if isinstance(key, int):
                int_keys.append(skey)
            out[skey] = self.visit(value, (*path, key))
        meta: dict[str, Any] = {}
        if int_keys:
            meta["int_keys"] = int_keys
        module_meta = getattr(node, "_metadata", None)
        if isinstance(module_meta, Mapping) and module_meta:
            meta["module_metadata"] = _Encoder().visit(dict(module_meta), (*path, "_metadata"))
        if meta:
            out[META] = meta
        return out


def encode(state: Any, prefix: tuple[Any, ...] = ()) -> Any:
    """Encode one torch state dict (or any nest of tensors and plain values) as a state tree.

    ``prefix`` is where ``state`` sits in a larger tree (``("model",)``), named in messages.

    Raises:
        StateTreeError: a value that is not a tree leaf, naming its key path.
    """
    enc = _Encoder(prefix)
    tree = enc.visit(state, ())
    if enc.aliases:
        if not isinstance(tree, dict):
            raise StateTreeError("state: shared tensors are supported only under a dict root")
        tree.setdefault(META, {})["aliases"] = enc.aliases
    return tree


def _decode_node(node: Any, copy: bool) -> Any:
    if isinstance(node, np.ndarray):
        return array_to_tensor(node, copy=copy)
    if isinstance(node, dict):
        meta = node.get(META)
        meta = meta if isinstance(meta, dict) else {}
        int_keys = set(meta.get("int_keys", ()))
        out: dict[Any, Any] = {}
        for key, value in node.items():
            if key == META:
                continue
            out[int(key) if key in int_keys else key] = _decode_node(value, copy)
        module_meta = meta.get("module_metadata")
        if isinstance(module_meta, dict):
            ordered: OrderedDict[Any, Any] = OrderedDict(out)
            ordered._metadata = module_meta  # type: ignore[attr-defined]
            return ordered
        return out
    if isinstance(node, list):
        return [_decode_node(v, copy) for v in node]
    if isinstance(node, tuple):
        return tuple(_decode_node(v, copy) for v in node)
    return node


def _lookup(root: Any, path: list[Any]) -> tuple[Any, Any]:
    """The container holding ``path``'s last part, and that part."""
    node = root
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


def decode(tree: Any, *, copy: bool = True) -> Any:
    """Invert :func:`encode`: arrays become CPU tensors, int keys and tied tensors come back.

    With ``copy=False`` tensors share memory with the arrays (fine when the caller copies them
    into existing parameters, as ``Module.load_state_dict`` does).

    Raises:
        StateTreeError: the alias table points at paths that are not in the tree.
    """
    out = _decode_node(tree, copy)
    meta = tree.get(META) if isinstance(tree, dict) else None
    aliases = meta.get("aliases", ()) if isinstance(meta, dict) else ()
    for alias, target in aliases:
        try:
            holder, last = _lookup(out, target)
            value = holder[last]
            holder, last = _lookup(out, alias)
            holder[last] = value
        except (KeyError, IndexError, TypeError) as exc:
            raise StateTreeError(
                f"{where(alias)}: tied-tensor record points nowhere ({exc!r})"
            ) from exc
    return out


def _like_dtensor(own: Any, stored: Any, path: tuple[Any, ...]) -> Any:
    """``stored`` (this rank's restored piece, or the full tensor) as a DTensor placed like
    ``own``; ``stored`` unchanged when its global shape differs (reported by the caller)."""
    offsets, shape = local_box(own)
    if tuple(stored.shape) != tuple(own.shape):
        return stored
    if isinstance(stored, ShardedArray):
        found = [s.data for s in stored.shards if s.offsets == offsets and s.data.shape == shape]
        if not found:
            raise StateTreeError(
                f"{where(path)}: the restored pieces do not hold this rank's box (offsets "
                f"{offsets}, shape {shape}); restore with template=template(obj)"
            )
        local = array_to_tensor(found[0], copy=True)
    else:  # a full tensor, e.g. read without a template: keep this rank's box of it
        local = stored[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]
    mine = own.to_local()
    local = local.to(device=mine.device, dtype=mine.dtype).contiguous()
    return DTensor.from_local(local, own.device_mesh, own.placements, run_check=False,
                              shape=own.shape, stride=own.stride())  # fmt: skip


def _whole(stored: ShardedArray, path: tuple[Any, ...]) -> torch.Tensor:
    """A restored :class:`ShardedArray` that is one piece covering the array, as a tensor."""
    if len(stored.shards) == 1 and stored.shards[0].data.shape == stored.shape:
        return array_to_tensor(stored.shards[0].data, copy=True)
    raise StateTreeError(
        f"{where(path)}: a sharded piece, but the object holds no DTensor here to place it in"
    )


def place(own: Any, stored: Any, path: tuple[Any, ...] = ()) -> Any:
    """``stored`` (a decoded state) with the tensors at ``own``'s DTensors made DTensors like
    them, and every :class:`ShardedArray` resolved, ready for ``load_state_dict``.

    ``own`` is the object's current ``state_dict()``: it tells where DTensors live and how
    they are placed. A restored piece must be this rank's box (restore with a template); a
    full tensor (read without one) is cut to this rank's box.

    Raises:
        StateTreeError: a piece that is not this rank's box, or a sharded piece where the
            object holds a plain tensor (the message names the path).
    """
    if DTensor is not None and isinstance(own, DTensor):
        if isinstance(stored, (ShardedArray, torch.Tensor)):
            return _like_dtensor(own, stored, path)
        return stored
    if isinstance(stored, ShardedArray):
        return _whole(stored, path)
    if isinstance(stored, Mapping):
        mine = own if isinstance(own, Mapping) else {}
        out = type(stored)((k, place(mine.get(k), v, (*path, k))) for k, v in stored.items())
        if hasattr(stored, "_metadata"):
            out._metadata = stored._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(stored, (list, tuple)):
        mine = own if isinstance(own, (list, tuple)) else ()
        items = [place(mine[i] if i < len(mine) else None, v, (*path, i))
                 for i, v in enumerate(stored)]  # fmt: skip
        return items if isinstance(stored, list) else tuple(items)
    return stored
