"""The library's version, in a leaf module so that any module can read it without a cycle."""

from __future__ import annotations

__all__ = ["__version__", "LIBRARY"]

__version__ = "0.1.0"
LIBRARY = f"checkpointer-engine {__version__}"  # recorded in every manifest
