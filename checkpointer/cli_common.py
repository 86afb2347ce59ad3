"""What every ``checkpointer`` command shares: storage options, progress, human output.

- ``--storage-option KEY=VALUE`` pairs become the fsspec options of each URL a command
  opens; an ``s3://`` URL also gets fail-fast retry defaults (two attempts) unless the user
  sets those keys, so a dead endpoint is an error within seconds, not a silent minute.
- Progress (bytes, throughput) is drawn by ``tqdm`` on a terminal only; it counts the bytes
  the read engine pulls through a store (:func:`counting`), so no reader needs a hook.
- Sizes and times are human (``1.5 MiB``, ``2025-06-01 12:00:03``); ``--json`` output is
  strict JSON (non-finite floats become strings).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, BinaryIO, cast

from .storage import Store

__all__ = ["parse_option", "options_for", "size", "when", "table", "emit_json", "jsonable",
           "display_key", "Progress", "counting", "S3_DEFAULTS"]

# One retry, a short connect timeout: botocore's defaults retry a refused connection for
# about 10 s without a word, which at a prompt looks like a hang.
S3_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("config_kwargs", "retries"): {"total_max_attempts": 2, "mode": "standard"},
    ("config_kwargs", "connect_timeout"): 5,
}


def parse_option(text: str) -> tuple[tuple[str, ...], Any]:
    """``KEY=VALUE`` -> ``(key path, value)``: dots nest (``client_kwargs.endpoint_url``), and a
    value that parses as JSON is taken as JSON (``5``, ``true``, ``{"a": 1}``, ``"0123"``),
    anything else as a string. An argparse ``type=``."""
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (e.g. client_kwargs.endpoint_url=http://127.0.0.1:9000)")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return parts, value


def _has(tree: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def options_for(pairs: Sequence[tuple[tuple[str, ...], Any]] | None, url: str) -> dict[str, Any] | None:
    """The fsspec options for ``url``: the user's pairs, plus :data:`S3_DEFAULTS` where the
    user set nothing at that key; ``None`` for a local path (no backend to configure)."""
    protocol = url.split("://", 1)[0] if "://" in url else ""
    if protocol in ("", "file", "local"):
        return None
    opts: dict[str, Any] = {}
    for path, value in pairs or ():
        _put(opts, path, value)
    if protocol in ("s3", "s3a"):
        for path, value in S3_DEFAULTS.items():
            if not _has(opts, path):
                _put(opts, path, copy.deepcopy(value))
    return opts


def size(n: int | None) -> str:
    """``512 B``, ``1.5 KiB``, ``2.0 GiB``; ``-`` when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when(t: Any) -> str:
    """Seconds since the epoch as local time, ``2025-06-01 12:00:03``; ``-`` when unknown."""
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):  # a forged time far outside the calendar
        return "-"


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns two spaces apart, trailing blanks dropped."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON data: non-finite floats as ``"nan"``/``"inf"``/``"-inf"``,
    bytes as their hex, tuples as lists, anything else unknown as its ``repr``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).hex()
    if hasattr(obj, "item") and callable(obj.item):  # a numpy scalar
        return jsonable(obj.item())
    return repr(obj)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as indented strict JSON on stdout."""
    print(json.dumps(jsonable(obj), indent=2, allow_nan=False))


def display_key(key: str) -> str:
    """A tensor key as the user wrote the tree: ``a~1b/c`` (parts ``a/b`` and ``c``) reads
    ``a/b/c``; inverse of :func:`checkpointer.tree.path_key`'s escaping, for display."""
    if key == "~__metadata__":
        return "__metadata__"
    return "/".join(p.replace("~1", "/").replace("~0", "~") for p in key.split("/"))


def _terminal_size() -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(sys.stderr.fileno()))  # type: ignore[return-value]
    except (OSError, ValueError):
        return (0, 0)


class Progress:
    """A byte counter drawn by ``tqdm`` on a terminal (stderr), nothing otherwise.

    ``wanted`` says whether a bar will be drawn (so callers skip work that only feeds it);
    :meth:`start` draws it once the total is known.

    Example::

        with Progress("verify", enabled=args.progress) as bar:
            bar.start(total)
            bar.update(n)
    """

    def __init__(self, what: str, *, enabled: bool = True) -> None:
        self.what = what
        self.wanted = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def start(self, total: int) -> None:
        """Draw the bar for ``total`` bytes (nothing when not ``wanted`` or ``total`` is 0)."""
        if self.wanted and total > 0 and self._bar is None:
            # Imported here: only a terminal needs it, and `checkpointer --help` stays fast.
            from tqdm import tqdm  # type: ignore[import-untyped]

            # A terminal that reports no size (a bare pty, a serial console) gets 80x24:
            # tqdm would draw nothing at all.
            sized = _terminal_size() != (0, 0)
            self._bar = tqdm(total=total, desc=self.what, unit="B", unit_scale=True,
                             unit_divisor=1024, leave=False, dynamic_ncols=sized,
                             ncols=None if sized else 80, nrows=None if sized else 24,
                             file=sys.stderr)

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def print(self, text: str) -> None:
        """Print a line on stdout without tearing the bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CountingFile:
    """A read handle that reports the bytes read to a :class:`Progress`."""

    def __init__(self, f: BinaryIO, progress: Progress) -> None:
        self._f, self._progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress.update(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        n = self._f.readinto(buf)  # type: ignore[attr-defined]
        self._progress.update(n or 0)
        return int(n or 0)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:  # seek, tell, close, ...
        return getattr(self._f, name)


class _CountingStore:
    """``store`` whose read handles count into ``progress``; everything else passes through."""

    def __init__(self, store: Store, progress: Progress) -> None:
        self._store, self._progress = store, progress

    def open_read(self, rel: str) -> BinaryIO:
        return cast(BinaryIO, _CountingFile(self._store.open_read(rel), self._progress))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def counting(store: Store, progress: Progress) -> Store:
    """``store`` itself when no bar is wanted, else a view of it that counts bytes read."""
    return cast(Store, _CountingStore(store, progress)) if progress.wanted else store
