"""``checkpointer export CKPT OUT.safetensors [--prefix P]``: the arrays of a checkpoint as
one standard safetensors file, which ``safetensors.*.load_file`` and every tool of that
ecosystem open as-is.

Keys are the tree paths as written (``model/layer.weight``), unescaped; with ``--prefix P``
only the arrays under ``P`` go, with ``P/`` stripped (``--prefix model`` of a torch adapter
state gives the module's own ``state_dict`` keys). A sharded array goes as one logical
tensor. The file is streamed one array at a time (each checksum checked as it is read),
written under a temporary name and renamed into place where the store can rename, so an
interrupted export never leaves a half file under ``OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from typing import Any

from .cli_arrays import Array, arrays, read_array
from .cli_common import Progress, counting, options_for, size
from .cli_list import open_checkpoint
from .errors import CheckpointError, CheckpointNotFoundError, ConfigurationError
from .format import raw_bytes
from .reader import CheckpointReader
from .storage import Store, open_store, split_url
from .version import LIBRARY

__all__ = ["cmd_export", "select"]


def select(found: list[Array], prefix: str | None) -> list[tuple[str, Array]]:
    """``(key in the file, array)`` of the arrays to export.

    Raises:
        ConfigurationError: no array under ``prefix`` (the message lists the top-level
            names there are), an array at the prefix itself, or two arrays whose unescaped
            keys collide.
    """
    if prefix is None:
        chosen = [(a.name, a) for a in found]
    else:
        p = prefix.strip("/")
        at = [a.name for a in found if a.name == p]
        if at:
            raise ConfigurationError(f"--prefix {prefix!r} is an array itself; pass its parent "
                                     "(or no --prefix)")
        chosen = [(a.name[len(p) + 1:], a) for a in found if a.name.startswith(p + "/")]
        if not chosen:
            tops = sorted({a.name.split("/", 1)[0] for a in found})
            raise ConfigurationError(f"no arrays under --prefix {prefix!r}; the top-level names "
                                     f"are: {', '.join(tops[:10]) or '(none)'}")
    seen: dict[str, str] = {}
    for key, a in chosen:
        if key == "__metadata__":
            raise ConfigurationError(f"array {a.key!r} would be named __metadata__, which "
                                     "safetensors reserves; pick another --prefix")
        if key in seen:
            raise ConfigurationError(f"arrays {seen[key]!r} and {a.key!r} would both be named "
                                     f"{key!r} in a flat safetensors file")
        seen[key] = a.key
    return chosen


def _header(chosen: list[tuple[str, Array]], source: str) -> tuple[bytes, list[tuple[str, Array]]]:
    """The safetensors header (largest item size first, so every tensor stays aligned) and
    the arrays in file order."""
    order = sorted(chosen, key=lambda ka: -ka[1].dtype.itemsize)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "source": source,
                                                  "exported_by": LIBRARY}}
    offset = 0
    for key, a in order:
        header[key] = {"dtype": a.code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(len(blob) + 8) % 8)
    return struct.pack("<Q", len(blob)) + blob, order


@contextlib.contextmanager
def _output(args: argparse.Namespace) -> Iterator[Any]:
    """A sink for ``args.out`` that replaces it only once complete."""
    parent, name = split_url(args.out)
    store: Store = open_store(parent, options_for(args.storage_option, args.out))
    if store.exists(name) and store.exists(f"{name}/"):
        raise ConfigurationError(f"{args.out} is a directory; name the .safetensors file to write")
    if not store.atomic_rename:  # an object store: the object appears whole when the upload ends
        with store.writer(name) as w:
            yield w
        return
    if not store.exists(""):
        raise CheckpointNotFoundError(f"{store.url}: no such directory for {name}")
    tmp = f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with store.writer(tmp) as w:
            yield w
        store.rename(tmp, name)
    except BaseException:
        with contextlib.suppress(CheckpointError):
            if store.exists(tmp):
                store.remove_file(tmp)
        raise


def cmd_export(args: argparse.Namespace) -> int:
    store, name = open_checkpoint(args, args.checkpoint)
    with Progress("export", enabled=args.progress) as bar, \
            CheckpointReader(counting(store, bar), name) as reader:
        chosen = select(arrays(reader.manifest, reader.url), args.prefix)
        head, order = _header(chosen, reader.url)
        total = len(head) + sum(a.nbytes for _, a in order)
        bar.start(total - len(head))  # the bytes read
        with _output(args) as sink:
            sink.write(head)
            for _, a in order:
                arr = read_array(reader, a)
                sink.write(raw_bytes(arr.reshape(-1)) if arr.size else b"")
    where = os.fspath(args.out)
    print(f"exported {len(order)} array{'s' * (len(order) != 1)} ({size(total)}) from {reader.url} to {where}")
    return 0
