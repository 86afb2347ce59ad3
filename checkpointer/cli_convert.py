"""``checkpointer convert SRC DST``: bring an existing file in as a checkpoint.

- ``.safetensors``: read with the engine's own hostile-input-safe parser; one array per key.
- ``.npz``: ``numpy.load(allow_pickle=False)``; an object array (it would need pickle) is
  dropped, never loaded.
- ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` (PyTorch, Lightning): ``torch.load(weights_only=True)``
  only, torch's restricted loader; a file it refuses is refused here too, with its reason:
  plain unpickling runs code from the file and is never used. The tree goes through the
  torch adapter's encoding (int keys of optimizer states and tied weights come back on
  ``checkpointer.adapters.torch.load_state``); what cannot be stored (a ``torch.dtype``, a
  sparse tensor, a set) is dropped and named.

The checkpoint is written by :func:`checkpointer.save` (a one-off, ``managed`` false, so no
``prune`` ever deletes it); its metadata records the source and what was dropped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .api import save
from .cli_common import options_for, size
from .cli_list import checkpoint_names, open_dir
from .dtypes import numpy_to_safetensors
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StateTreeError,
)
from .format import read_header
from .manifest import MANIFEST_NAME
from .reading import read_tensors
from .storage import Store, open_store, split_url
from .tree import flatten

__all__ = ["cmd_convert", "KINDS"]

KINDS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch", ".pth": "torch",
         ".ckpt": "torch", ".bin": "torch"}
_TORCH_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64", "complex64", "bfloat16", "float8_e4m3fn",
                 "float8_e5m2")
_PLAIN = (type(None), bool, int, float, str, bytes)


class _Drop:
    """Marks a value left out of the converted tree."""


_DROP = _Drop()


def _read_safetensors(store: Store, name: str, dropped: list[str]) -> tuple[Any, dict[str, Any]]:
    where = store.url_of(name)
    with store.open_read(name) as f:
        entries, _ = read_header(f, store.size(name), where)
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__")  # checked by read_header already
        found, _ = read_tensors(f, entries, None, where)
    extra = {"safetensors_metadata": meta} if isinstance(meta, dict) and meta else {}
    return {e.key: found[e.key] for e in entries}, extra


def _read_npz(store: Store, name: str, dropped: list[str]) -> tuple[Any, dict[str, Any]]:
    out: dict[str, Any] = {}
    with store.open_read(name) as f:
        try:
            npz = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CorruptCheckpointError(f"{store.url_of(name)}: not a readable .npz file ({exc})") from exc
        if not hasattr(npz, "files"):
            raise ConfigurationError(f"{store.url_of(name)} is a single .npy array, not an .npz archive")
        with npz:
            for key in npz.files:
                try:
                    arr = npz[key]
                except ValueError as exc:  # an object array: it would need pickle
                    dropped.append(f"{key}: {exc}")
                    continue
                if numpy_to_safetensors(arr.dtype) is None:
                    dropped.append(f"{key}: dtype {arr.dtype} cannot be stored")
                    continue
                out[key] = arr
    return out, {}


def _torch_adapter() -> Any:
    """The torch adapter, looked up by name (it is optional, like fsspec's registry): the core
    never imports a framework; the adapter imports torch and names the extra when it is missing."""
    try:
        return importlib.import_module("checkpointer.adapters.torch")
    except ImportError as exc:
        raise ConfigurationError(f"converting a PyTorch file needs torch: {exc}") from exc


def _clean(node: Any, path: str, dropped: list[str], torch: Any, ok: set[Any]) -> Any:
    """``node`` with what the tree cannot hold replaced by ``_DROP`` (and named in ``dropped``)."""
    if isinstance(node, torch.Tensor):
        if node.layout == torch.strided and not node.is_quantized and not node.is_meta and node.dtype in ok:
            return node
        dropped.append(f"{path}: a {node.layout} {node.dtype} tensor on {node.device}")
        return _DROP
    if isinstance(node, (np.ndarray, np.generic)):
        if numpy_to_safetensors(node.dtype) is not None and not isinstance(node, np.ma.MaskedArray):
            return node
        dropped.append(f"{path}: a numpy {type(node).__name__} of dtype {node.dtype}")
        return _DROP
    if isinstance(node, _PLAIN):
        return node
    elif isinstance(node, Mapping):
        out = {}
        for k, v in node.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                dropped.append(f"{path}[{k!r}]: a key of type {type(k).__name__}")
                continue
            value = _clean(v, f"{path}[{k!r}]", dropped, torch, ok)
            if value is not _DROP:
                out[k] = value
        return out
    elif isinstance(node, (list, tuple)):
        items = [_clean(v, f"{path}[{i}]", dropped, torch, ok) for i, v in enumerate(node)]
        kept = [v if v is not _DROP else None for v in items]  # positions keep their meaning
        return kept if isinstance(node, list) else tuple(kept)
    dropped.append(f"{path}: {type(node).__module__}.{type(node).__qualname__}")
    return _DROP


def _read_torch(store: Store, name: str, dropped: list[str]) -> tuple[Any, dict[str, Any]]:
    adapter = _torch_adapter()
    torch = adapter.torch
    where = store.url_of(name)
    with store.open_read(name) as f:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = (" It holds objects beyond tensors and plain values; plain unpickling would run "
                    "code from the file and is never used: re-save only what is needed, e.g. "
                    "torch.save(model.state_dict(), path).") if "weights_only" in str(exc) \
                or "Unsupported" in str(exc) else ""
            raise ConfigurationError(f"{where}: torch.load(weights_only=True) refuses it: {reason}.{hint}") from None
    ok = {getattr(torch, n) for n in _TORCH_DTYPES if hasattr(torch, n)}
    clean = _clean(obj, "state", dropped, torch, ok)
    if clean is _DROP:
        raise ConfigurationError(f"{where} holds nothing that can be stored ({dropped[-1]})")
    # the adapter encodes int keys and tied tensors so that load_state restores them
    try:
        return adapter.to_state(clean), {}
    except StateTreeError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None


_READERS: dict[str, Callable[[Store, str, list[str]], tuple[Any, dict[str, Any]]]] = {
    "safetensors": _read_safetensors, "npz": _read_npz, "torch": _read_torch}


def _kind(args: argparse.Namespace) -> str:
    if args.src_format:
        return str(args.src_format)
    lower = args.src.lower()
    for suffix, kind in KINDS.items():
        if lower.endswith(suffix):
            return kind
    raise ConfigurationError(f"cannot tell the format of {args.src} from its name; it should end in "
                             f"{', '.join(KINDS)} (or pass --from safetensors|npz|torch)")


def _check_destination(args: argparse.Namespace) -> None:
    parent, name = split_url(args.dst)
    store = open_store(parent, options_for(args.storage_option, args.dst))
    if store.exists(f"{name}/{MANIFEST_NAME}"):
        if not args.overwrite:
            raise ConfigurationError(f"{args.dst} is a checkpoint already; pass --overwrite to replace it")
    elif store.exists(name):
        inside = open_dir(args, args.dst).list_files()
        if checkpoint_names(inside):
            raise ConfigurationError(f"{args.dst} is a directory of checkpoints; name a new checkpoint "
                                     f"inside it, e.g. {args.dst.rstrip('/')}/imported")
        if inside:
            raise ConfigurationError(f"{args.dst} exists and is not a checkpoint; pick a new name")


def cmd_convert(args: argparse.Namespace) -> int:
    kind = _kind(args)
    parent, name = split_url(args.src)
    src = open_store(parent, options_for(args.storage_option, args.src))
    if not src.exists(name):
        raise CheckpointNotFoundError(f"{src.url_of(name)}: no such file")
    nbytes = src.size(name)
    _check_destination(args)
    dropped: list[str] = []
    state, extra = _READERS[kind](src, name, dropped)
    try:
        count = len(flatten(state)[1])
    except CheckpointError as exc:
        raise ConfigurationError(f"{src.url_of(name)}: {exc}") from None
    info = save(args.dst, state, storage_options=options_for(args.storage_option, args.dst),
                metadata={"converted_from": src.url_of(name), "format": kind, "dropped": dropped, **extra})
    print(f"converted {src.url_of(name)} ({kind}, {size(nbytes)}) to {info.url}: {count} "
          f"array{'s' * (count != 1)}, {size(info.nbytes)}")
    if dropped:
        print(f"dropped {len(dropped)} value{'s' * (len(dropped) != 1)} that a checkpoint cannot hold:")
        for line in dropped:
            print(f"  {line}")
    return 0
