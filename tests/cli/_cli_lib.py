"""Helpers the command-line tests import (a module of its own: ``conftest`` is a name that
several test folders share)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flip_byte(path: str, offset: int = -1) -> None:
    raw = bytearray(open(path, "rb").read())
    raw[offset] ^= 0x01
    open(path, "wb").write(bytes(raw))
