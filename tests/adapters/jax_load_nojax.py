"""Subprocess script: load checkpoints written from JAX with ``checkpointer.load`` alone.

Usage: ``python jax_load_nojax.py URL [URL ...]``. Prints one JSON object: whether ``jax`` got
imported, and for each URL every leaf as ``[path, type, dtype, shape, sha256 of its bytes]``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

import checkpointer


def leaves(node: Any, path: str = "") -> Iterator[list[Any]]:
    """Every leaf of a state tree with its path, in order."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from leaves(v, f"{path}/{i}")
    elif isinstance(node, (np.ndarray, np.generic)):
        digest = hashlib.sha256(np.ascontiguousarray(node).tobytes()).hexdigest()
        yield [path, type(node).__name__, node.dtype.name, list(np.shape(node)), digest]
    else:
        yield [path, type(node).__name__, None, None, repr(node)]


if __name__ == "__main__":
    loaded = {url: list(leaves(checkpointer.load(url))) for url in sys.argv[1:]}
    print(json.dumps({"jax_imported": "jax" in sys.modules, "leaves": loaded}))
