"""Small pieces of the Keras callbacks: Keras's argument rules (``mode``, ``save_freq``, a
weights-only path), its printer and messages, log and path helpers, and the preemption stop."""

from __future__ import annotations

import logging
import string
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from checkpointer.errors import ConfigurationError
from checkpointer.naming import template_fields
from checkpointer.preemption import PreemptionWatch, preemption_options

from . import _keras_files as files

__all__ = [
    "check_mode",
    "check_save_freq",
    "check_preemption_path",
    "check_weights_path",
    "BatchCounter",
    "print_msg",
    "print_save",
    "direction_from_model",
    "scalar_logs",
    "split_managed",
    "PreemptionStop",
]

_log = logging.getLogger("checkpointer")


def print_msg(message: str) -> None:
    """Print like Keras's callbacks do (honours ``keras.config.disable_interactive_logging``)."""
    try:
        from keras.src.utils.io_utils import print_msg as keras_print
    except ImportError:  # pragma: no cover - a Keras without that private helper
        print(message)
    else:
        keras_print(message)


def print_save(
    verbose: int,
    epoch: int,
    monitor: str,
    best: float | None,
    value: float | None,
    path: str | None,
    ranked: bool,
) -> None:
    """Keras's message for a save point (1-based ``epoch``), printed when ``verbose > 0``:
    ``path`` None means the monitored value did not improve on ``best``; with ``ranked``
    (save-best) a save says by how much it improved."""
    if verbose <= 0:
        return
    best_str = "None" if best is None else f"{best:.5f}"
    if path is None:
        print_msg(f"\nEpoch {epoch}: {monitor} did not improve from {best_str}")
    elif ranked:
        print_msg(
            f"\nEpoch {epoch}: {monitor} improved from {best_str} to "
            f"{value:.5f}, saving model to {path}"
        )
    else:
        print_msg(f"\nEpoch {epoch}: saving model to {path}")


def check_mode(mode: str) -> str:
    """Keras's ``mode`` rule: an unknown mode warns and falls back to ``"auto"``."""
    if mode not in ("auto", "min", "max"):
        warnings.warn(
            f"ModelCheckpoint mode '{mode}' is unknown, fallback to auto mode.", stacklevel=3
        )
        return "auto"
    return mode


def check_weights_path(filepath: str, keras_file: bool, save_weights_only: bool) -> None:
    """Keras's rule: a Keras file saved weights-only must be a ``.weights.h5``."""
    if keras_file and save_weights_only and not filepath.endswith(".weights.h5"):
        raise ConfigurationError(
            "When using `save_weights_only=True` in `ModelCheckpoint`, the filepath provided "
            f"must end in `.weights.h5` (Keras weights format). Received: filepath={filepath}"
        )


def check_preemption_path(enabled: bool, best_only: bool, name: str, filepath: str) -> None:
    """A preemption save must not replace the best model: with ``save_best_only`` the name
    needs a field (``{epoch}``, ``{batch}``)."""
    if enabled and best_only and "{" not in name:
        raise ConfigurationError(
            f"save_on_preemption=True with save_best_only=True and filepath={filepath!r}: the "
            "preemption save would replace the best model with the model at the signal. Put "
            "{epoch} or {batch} in the filepath, or resume with "
            "BackupAndRestore(save_on_preemption=True)."
        )


def check_save_freq(save_freq: Any, *, allow_false: bool = False) -> str | int | bool:
    """Validate Keras's ``save_freq``: ``"epoch"`` or a positive number of batches
    (``False`` too, meaning no scheduled saves, where ``allow_false``)."""
    if save_freq == "epoch":
        return "epoch"
    if allow_false and save_freq is False:
        return False
    if isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1:
        raise ConfigurationError(
            f"Unrecognized save_freq: {save_freq!r}. Expected 'epoch' or a positive integer "
            "(a number of batches)."
        )
    return save_freq


class BatchCounter:
    """Keras's batch counting for an integer ``save_freq``.

    ``batch`` is the index of the last batch run (with ``steps_per_execution`` it jumps);
    an index not above the previous one starts a new epoch.
    """

    def __init__(self, every: int) -> None:
        self.every, self.seen = every, 0
        self.last: int | None = None

    def due(self, batch: int) -> bool:
        """Count the batches up to ``batch``; True (and reset) once ``every`` are reached."""
        if self.last is None or batch <= self.last:
            self.seen += batch + 1
        else:
            self.seen += batch - self.last
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


def scalar_logs(logs: Mapping[str, Any]) -> dict[str, float]:
    """The log entries that are scalar numbers, as floats (others cannot be metrics)."""
    out = {}
    for key, value in logs.items():
        try:
            out[key] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue  # non-scalar logs cannot be stored as metrics
    return out


def split_managed(filepath: str) -> tuple[str, str | None]:
    """``(directory, filename template)`` for a path in this project's format."""
    parent, name = files.split_path(filepath.rstrip("/"))
    if "{" in parent:
        raise ConfigurationError(
            f"filepath {filepath!r}: only the last part of a path in this project's format may "
            "hold {fields}; the folders must be fixed"
        )
    if "{" in name or name.endswith(".safetensors"):
        template_fields(name)
        return parent, _int_batch_fields(name)
    return filepath, None


def _int_batch_fields(template: str) -> str:
    """Rewrite ``{batch}`` / ``{batch:02d}`` for a float value: the manager stores metrics
    (where ``batch`` travels) as floats, and Keras names show the batch as an integer."""
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field == "batch" and not conversion and (not spec or spec.endswith("d")):
            spec = (spec[:-1] if spec else "") + ".0f"
        out.append(
            "{"
            + field
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
    return "".join(out)


class PreemptionStop:
    """``save_on_preemption`` of a Keras callback.

    From ``on_train_begin`` (:meth:`start`) to ``on_train_end`` (:meth:`close`) the core's
    :class:`~checkpointer.preemption.PreemptionWatch` is installed: its handler only records
    the notice (and calls the handler it replaced). The callback asks :meth:`due` at each
    batch end and epoch end; when a notice is due it saves there, whatever its schedule says,
    waits until that save has committed, then calls :meth:`stopped`, which sets
    ``model.stop_training``. One process only: every process watches its own signals.

    Several callbacks each install a watch on top of the previous one, and Keras ends them
    in list order, oldest first; a watch can only put its predecessor back while it is the
    installed handler. So the watches are closed newest first: :meth:`close` releases this
    one, then closes the released watches at the top of the stack.

    Raises:
        ConfigurationError: ``enabled`` not a bool, or a signal that cannot be caught
            (at construction, like Keras's own argument checks); :meth:`start` outside the
            main thread.
    """

    _stack: ClassVar[list[PreemptionWatch]] = []  # this process's open watches, oldest first
    _released: ClassVar[set[PreemptionWatch]] = set()  # their callbacks have ended

    def __init__(self, enabled: Any, signals: Sequence[str | int] | str | int) -> None:
        self.signals = preemption_options(enabled, signals)
        self.enabled = enabled
        self.watch: PreemptionWatch | None = None
        self.done = False  # the preemption save has committed and training was told to stop

    def start(self) -> None:
        """Install the handlers for a new ``fit`` (a notice from an earlier one is dropped)."""
        self.close()
        self.done = False
        if self.enabled:
            self.watch = PreemptionWatch(self.signals)
            self._stack.append(self.watch)

    def due(self) -> str | None:
        """The notice to act on now (the signal's name), or ``None``."""
        return None if self.done or self.watch is None else self.watch.requested

    def stopped(self, model: Any, url: str | None) -> None:
        """The preemption save at ``url`` has committed: stop training after this batch."""
        self.done = True
        model.stop_training = True
        why = None if self.watch is None else self.watch.requested
        _log.warning("preemption (%s): saved %s; training stops", why, url)

    def close(self) -> None:
        """Put the previous signal handlers back (once the watches above this one are gone)."""
        if self.watch is None:
            return
        self._released.add(self.watch)
        self.watch = None
        while self._stack and self._stack[-1] in self._released:
            top = self._stack.pop()
            self._released.discard(top)
            top.close()

