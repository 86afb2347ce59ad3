"""Small pieces of the Keras callbacks: Keras's argument rules and messages, its batch
counting and path translation."""

from __future__ import annotations

import warnings
from typing import Any

from checkpointer.errors import ConfigurationError
from checkpointer.naming import template_fields

__all__ = ["KERAS_SUFFIXES", "RESUMED", "check_mode", "check_save_freq", "check_preemption_path",
           "check_weights_path", "BatchCounter", "print_msg", "print_save", "direction_from_model",
           "split_filepath"]  # fmt: skip

KERAS_SUFFIXES = (".weights.h5", ".keras", ".h5")
RESUMED: set[int] = set()  # id() of the models a BackupAndRestore restored in the running fit


def print_msg(message: str) -> None:
    """Print like Keras's callbacks do (honours ``keras.config.disable_interactive_logging``)."""
    try:
        from keras.src.utils.io_utils import print_msg as keras_print
    except ImportError:  # pragma: no cover - a Keras without that private helper
        print(message)
    else:
        keras_print(message)


def print_save(verbose: int, epoch: int, monitor: str, best: float | None, value: float | None,
               path: str | None, ranked: bool) -> None:  # fmt: skip
    """Keras's message for a save point (1-based ``epoch``) when ``verbose > 0``: ``path``
    None means the value did not improve on ``best``; ``ranked`` (save-best) says by how much."""
    if verbose <= 0:
        return
    best_str = "None" if best is None else f"{best:.5f}"
    if path is None:
        print_msg(f"\nEpoch {epoch}: {monitor} did not improve from {best_str}")
    elif ranked:
        print_msg(f"\nEpoch {epoch}: {monitor} improved from {best_str} to {value:.5f}, "
                  f"saving model to {path}")  # fmt: skip
    else:
        print_msg(f"\nEpoch {epoch}: saving model to {path}")


def check_mode(mode: str) -> str:
    """Keras's ``mode`` rule: an unknown mode warns and falls back to ``"auto"``."""
    if mode in ("auto", "min", "max"):
        return mode
    warnings.warn(f"ModelCheckpoint mode '{mode}' is unknown, fallback to auto mode.", stacklevel=3)
    return "auto"


def check_weights_path(filepath: str, keras_file: bool, save_weights_only: bool) -> None:
    """Keras's rule: a Keras file saved weights-only must be a ``.weights.h5``."""
    if keras_file and save_weights_only and not filepath.endswith(".weights.h5"):
        raise ConfigurationError(
            "When using `save_weights_only=True` in `ModelCheckpoint`, the filepath provided "
            f"must end in `.weights.h5` (Keras weights format). Received: filepath={filepath}")


def check_preemption_path(enabled: bool, best_only: bool, name: str, filepath: str) -> None:
    """With ``save_best_only`` a preemption save needs a name field, or it replaces the best."""
    if enabled and best_only and "{" not in name:
        raise ConfigurationError(
            f"save_on_preemption=True with save_best_only=True and filepath={filepath!r}: the "
            "preemption save would replace the best model with the model at the signal. Put "
            "{epoch} or {batch} in the filepath, or resume with "
            "BackupAndRestore(save_on_preemption=True).")


def check_save_freq(save_freq: Any, *, backup: bool = False) -> str | int | bool:
    """Keras's ``save_freq``: ``"epoch"`` or a positive number of batches (``False`` too for
    ``BackupAndRestore``: no scheduled backups), refused with the message of Keras's callback
    (``backup``: ``BackupAndRestore``'s)."""
    if save_freq == "epoch" or (backup and save_freq is False):
        return "epoch" if save_freq == "epoch" else False
    if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1:
        expected = "'epoch' or a positive integer (a number of batches)"
        raise ConfigurationError(
            f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
            f"Expected either {expected}." if backup
            else f"Unrecognized save_freq: {save_freq!r}. Expected {expected}.")  # fmt: skip
    return save_freq


class BatchCounter:
    """Keras's batch counting for an integer ``save_freq``: ``batch`` is the index of the last
    batch run (it jumps with ``steps_per_execution``); one not above the previous starts an epoch."""

    def __init__(self, every: int) -> None:
        self.every, self.seen = every, 0
        self.last: int | None = None

    def due(self, batch: int) -> bool:
        """Count the batches up to ``batch``; True (and reset) once ``every`` are reached."""
        new_epoch = self.last is None or batch <= self.last
        self.seen += batch + 1 if new_epoch or self.last is None else batch - self.last
        self.last = batch
        if self.seen >= self.every:
            self.seen = 0
            return True
        return False


def direction_from_model(model: Any, monitor: str) -> str | None:
    """Keras's fallback for ``mode="auto"``: the ``_direction`` of a compiled metric."""
    name = monitor.removeprefix("val_")
    for metric in getattr(model, "metrics", []) or []:
        for sub in [metric, *(getattr(metric, "metrics", None) or [])]:
            direction = getattr(sub, "_direction", None)
            if getattr(sub, "name", None) == name and direction in ("up", "down"):
                return "max" if direction == "up" else "min"
    return None


def split_filepath(filepath: str, keras_file: bool) -> tuple[str, str | None, str]:
    """``(directory, name template, prefix)`` of a callback's ``filepath`` (a plain folder:
    itself and ``None``); ``prefix``: the folder as written, for messages.

    Raises:
        ConfigurationError: ``{fields}`` in a folder, or an invalid name template.
    """
    text = filepath.rstrip("/")
    protocol, sep, rest = text.rpartition("://")
    parent, slash, name = (rest if sep else text).rpartition("/")
    directory = f"{protocol}://{parent}" if sep else (parent or ("/" if slash else "."))
    if "{" in directory:
        raise ConfigurationError(f"filepath {filepath!r}: only the file name may hold "
                                 "{fields}; the folders must be fixed")  # fmt: skip
    if keras_file or "{" in name or name.endswith(".safetensors"):
        template_fields(name)
        return directory, name, filepath[: len(filepath) - len(name)]
    return filepath, None, text + "/"

