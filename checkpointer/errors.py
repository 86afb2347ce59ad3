"""The exception tree of the engine.

Every error the engine raises on purpose derives from :class:`CheckpointError`, and
also from the built-in exception that fits, so ``except FileNotFoundError`` and
``except ValueError`` keep working::

    CheckpointError
    ├── ConfigurationError (ValueError)        a bad option, found at construction
    │   └── UnknownOptionError (TypeError)     a keyword the callable does not take
    ├── StateTreeError (TypeError)             a state tree holding an unsupported leaf
    ├── MetricError (ValueError)               a NaN/inf metric under nan_policy="raise"
    ├── CheckpointNotFoundError (FileNotFoundError)
    ├── StorageError (OSError)                 the store failed: disk full, network, fsync
    ├── InsufficientMemoryError (MemoryError)  not enough memory to read or stage a checkpoint
    └── CorruptCheckpointError                 bytes on storage are not a valid checkpoint
        ├── ChecksumMismatchError              a checksum does not match the bytes
        ├── TruncatedFileError                 a file is shorter than it claims
        ├── TrailingDataError                  a file is longer than it claims
        ├── ManifestError                      the manifest is unreadable or inconsistent
        └── HeaderError                        a safetensors header breaks a rule
            ├── HeaderTooLargeError            a size beyond the cap, before allocation
            ├── InvalidOffsetsError            offsets overlap, leave gaps or overflow
            ├── UnsupportedDtypeError          a dtype outside the allow-list
            ├── DuplicateKeyError              a key given twice
            └── UnsafePathError                ``..``, absolute names, separators

Storage backends' own exceptions are mapped into this tree with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigurationError",
    "UnknownOptionError",
    "StateTreeError",
    "MetricError",
    "CheckpointNotFoundError",
    "StorageError",
    "InsufficientMemoryError",
    "CorruptCheckpointError",
    "ChecksumMismatchError",
    "TruncatedFileError",
    "TrailingDataError",
    "ManifestError",
    "HeaderError",
    "HeaderTooLargeError",
    "InvalidOffsetsError",
    "UnsupportedDtypeError",
    "DuplicateKeyError",
    "UnsafePathError",
]


class CheckpointError(Exception):
    """Root of every error raised by the engine."""


class ConfigurationError(CheckpointError, ValueError):
    """An option has an invalid value or combination; raised when the object is built."""


class UnknownOptionError(ConfigurationError, TypeError):
    """A keyword argument the callable does not take; the message names the option meant
    (a ``TypeError`` too, as Python's own error for an unknown keyword is)."""


class StateTreeError(CheckpointError, TypeError):
    """A state tree holds something that cannot be stored (the message names the path)."""


class MetricError(CheckpointError, ValueError):
    """A monitored metric is NaN or infinite and ``nan_policy="raise"``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint matches the request (or the directory holds none)."""


class StorageError(CheckpointError, OSError):
    """The storage backend failed (disk full, permission, network, fsync)."""


class InsufficientMemoryError(CheckpointError, MemoryError):
    """Not enough memory to read, decode or stage a checkpoint (the checkpoint is not at fault)."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes are not a valid checkpoint; the message names the file and the problem."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A tensor, file or manifest checksum does not match its bytes."""


class TruncatedFileError(CorruptCheckpointError):
    """A file ends before the data it declares."""


class TrailingDataError(CorruptCheckpointError):
    """A file holds bytes beyond the data it declares."""


class ManifestError(CorruptCheckpointError):
    """The manifest is missing, too large, undecodable or inconsistent with the data files."""


class HeaderError(CorruptCheckpointError):
    """A safetensors header breaks one of the format's rules."""


class HeaderTooLargeError(HeaderError):
    """A declared size exceeds the cap; refused before anything is allocated."""


class InvalidOffsetsError(HeaderError):
    """Tensor offsets overlap, leave gaps, overflow or disagree with dtype and shape."""


class UnsupportedDtypeError(HeaderError):
    """A dtype outside the allow-list."""


class DuplicateKeyError(HeaderError):
    """The same key appears twice."""


class UnsafePathError(HeaderError):
    """A file or key name tries to escape its folder (``..``, absolute, separators)."""
