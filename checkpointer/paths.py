"""Render tree paths for messages and join URL parts: the one place for both (stdlib only).

``render_path`` is the form every error message uses to name a place in a state tree
(``state['model']['layers'][0]``); ``join_url`` puts a name below a folder or fsspec URL
(``memory://ckpts`` + ``step-1`` -> ``memory://ckpts/step-1``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["render_path", "join_url"]


def render_path(parts: Iterable[object], root: str = "state") -> str:
    """``root`` followed by ``[part!r]`` for each part: ``state['a'][0]``.

    Args:
        parts: the keys from the root down (``str`` dict keys, ``int`` list indices).
        root: the name of the tree itself.

    Example::

        >>> render_path(["opt", 0, "exp_avg"])
        "state['opt'][0]['exp_avg']"
    """
    return root + "".join(f"[{p!r}]" for p in parts)


def join_url(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a local path or an fsspec URL, with one ``/`` between parts.

    Trailing slashes of ``base`` and slashes around each part are dropped; empty parts are
    skipped; a bare protocol root (``memory://``) and an empty base are kept as they are.

    Example::

        >>> join_url("s3://bucket/ckpts/", "step-1", "manifest.msgpack")
        's3://bucket/ckpts/step-1/manifest.msgpack'
        >>> join_url("memory://", "x")
        'memory://x'
    """
    text = os.fspath(base)
    names = [p.strip("/") for p in parts if p.strip("/")]
    if not names:
        return text
    if text.endswith("://") or not text:
        return text + "/".join(names)
    head = text.rstrip("/") or "/"
    return (head if head.endswith("/") else head + "/") + "/".join(names)
