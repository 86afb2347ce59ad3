"""The one import guard of the adapters: a missing framework names the extra to install.

Each adapter imports its framework at its own top, inside this guard, so importing
``checkpointer`` or ``checkpointer.adapters`` never imports a framework.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["require", "install_hint"]


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'checkpointer-engine[torch]'``."""
    return f"pip install 'checkpointer-engine[{extra}]'"


@contextmanager
def require(adapter: str, needs: str, extra: str) -> Iterator[None]:
    """Turn an ``ImportError`` raised inside the block into one naming the extra.

    Args:
        adapter: the importing module (``__name__``), named in the message.
        needs: what it needs, in words (``"PyTorch"``).
        extra: the package extra that installs it (``"torch"``).

    Raises:
        ImportError: ``"<adapter> needs <needs>: pip install 'checkpointer-engine[<extra>]'"``,
            chained to the original error.

    Example::

        with require(__name__, "PyTorch", "torch"):
            import torch
    """
    try:
        yield
    except ImportError as exc:
        raise ImportError(f"{adapter} needs {needs}: {install_hint(extra)}") from exc
