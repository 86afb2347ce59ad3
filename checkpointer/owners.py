"""Owner tokens: who wrote a leftover, and whether that writer is provably gone.

Every write that can leave something behind (a temporary folder, a data object, a half-done
replacement) carries an owner token ``host.pid.random`` in its name. Cleanup removes a
leftover only when its owner ran on this host and is dead: its process is gone, or it is
this process and the write that took the token has finished.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading

__all__ = ["HOST", "OWNER_PATTERN", "new_owner", "release_owner", "owner_is_dead", "is_owner"]

HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
OWNER_PATTERN = r"[A-Za-z0-9]+\.\d+\.[0-9a-f]+"
_OWNER_RE = re.compile(r"(?P<host>[A-Za-z0-9]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]+)")
_active: set[str] = set()
_active_lock = threading.Lock()


def new_owner() -> str:
    """A fresh owner token, registered as live in this process until released."""
    token = f"{HOST}.{os.getpid()}.{secrets.token_hex(4)}"
    with _active_lock:
        _active.add(token)
    return token


def release_owner(owner: str) -> None:
    """Mark ``owner`` finished: its leftovers may now be cleaned up."""
    with _active_lock:
        _active.discard(owner)


def owner_is_dead(owner: str) -> bool:
    """True only when ``owner`` ran on this host and its process (or its save) is gone."""
    m = _OWNER_RE.fullmatch(owner)
    if m is None or m["host"] != HOST:
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        with _active_lock:
            return owner not in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but was never reaped (Linux; a container whose init does
    not reap orphans keeps them): gone for our purposes, though ``kill(pid, 0)`` succeeds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rpartition(b")")[2].split()[:1]  # the name in parentheses may hold spaces
    return state in ([b"Z"], [b"X"])


def is_owner(text: str) -> bool:
    """Whether ``text`` has the shape of an owner token."""
    return _OWNER_RE.fullmatch(text) is not None
