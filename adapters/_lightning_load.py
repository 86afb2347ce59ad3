"""The Lightning trainer's side of this format: which ``CheckpointIO`` writes, and loading
a ``LightningModule`` for inference from a checkpoint folder.

``install_checkpoint_io`` is what ``ModelCheckpoint.setup`` calls: Lightning's default
``TorchCheckpointIO`` (pickle) is replaced by :class:`SafeCheckpointIO`, also inside
Lightning's ``AsyncCheckpointIO``; any other plugin would write files this library cannot
read back, so it is refused there, at ``setup``, not at the first resume.

``Model.load_from_checkpoint(path)`` reads with ``torch.load``, which cannot open a folder:
:func:`load_from_checkpoint` has its signature (``load_from_checkpoint(Model, path, ...)``)
and the :class:`SafeLoading` mixin gives the model class the method itself.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from checkpointer.errors import ConfigurationError

from ._torch_lightning_io import SafeCheckpointIO

__all__ = ["install_checkpoint_io", "load_from_checkpoint", "SafeLoading", "OrderedAsyncCheckpointIO"]

log = logging.getLogger("checkpointer")
M = TypeVar("M", bound=pl.LightningModule)


class OrderedAsyncCheckpointIO(AsyncCheckpointIO):
    """Lightning's ``AsyncCheckpointIO`` whose removals wait for the saves queued before
    them (Lightning's removes at once: a top-k checkpoint still being written when it
    drops out of the top k would be written after its removal, and stay)."""

    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path`` in the writer thread, after the saves queued so far."""
        self._ensure_setup()
        assert self._executor is not None
        self._executor.submit(self._remove, path)

    def _remove(self, path: Any) -> None:
        try:
            super().remove_checkpoint(path)
        except BaseException as exc:  # raised at the next save or at teardown, as a save's
            self._error = exc


def _ours(io: Any) -> bool:
    return io is None or type(io) is TorchCheckpointIO or isinstance(io, SafeCheckpointIO)


def install_checkpoint_io(trainer: pl.Trainer, async_save: bool,
                          storage_options: dict[str, Any] | None) -> None:  # fmt: skip
    """Make ``trainer`` write through :class:`SafeCheckpointIO` (in Lightning's
    ``AsyncCheckpointIO`` with ``async_save``).

    Raises:
        ConfigurationError: the trainer has another ``CheckpointIO`` plugin, or spawns its
            processes without ``SafeCheckpointIO`` (the main process could not read back
            the weights that the spawned rank 0 hands over).
    """
    strategy = trainer.strategy
    current = strategy._checkpoint_io  # the property would install TorchCheckpointIO itself
    inner = current.checkpoint_io if isinstance(current, AsyncCheckpointIO) else current
    if not _ours(inner):
        raise ConfigurationError(
            f"checkpointer's ModelCheckpoint writes through SafeCheckpointIO, but the trainer "
            f"has the plugin {type(inner).__name__}, which would write a format it cannot read "
            "back; drop that plugin, or use Lightning's own ModelCheckpoint with it")
    if isinstance(strategy.launcher, _MultiProcessingLauncher) and not isinstance(
            inner, SafeCheckpointIO):  # fmt: skip
        raise ConfigurationError(
            "strategy='ddp_spawn' (or another spawning strategy) hands the trained weights back "
            "to the main process through the trainer's CheckpointIO, which there is still "
            "Lightning's pickle TorchCheckpointIO: pass Trainer(plugins=[SafeCheckpointIO()])")
    safe = inner if isinstance(inner, SafeCheckpointIO) else SafeCheckpointIO(
        storage_options=storage_options)
    if type(current) is AsyncCheckpointIO or (async_save and current is inner):
        strategy.checkpoint_io = OrderedAsyncCheckpointIO(safe)  # Lightning's, removals in order
    elif isinstance(current, AsyncCheckpointIO):
        current._checkpoint_io = safe  # the setter refuses once a base was configured
        strategy.checkpoint_io = OrderedAsyncCheckpointIO(safe)
    else:
        strategy.checkpoint_io = safe
    if safe is not inner:
        log.info("ModelCheckpoint installed SafeCheckpointIO on the trainer (no pickle)")


def load_from_checkpoint(cls: type[M], checkpoint_path: Any, map_location: Any = None,
                         hparams_file: Any = None, strict: bool | None = None,
                         **kwargs: Any) -> M:  # fmt: skip
    """``cls.load_from_checkpoint(checkpoint_path, ...)`` for a checkpoint folder of this
    format: the model built from its saved hyperparameters (``kwargs`` override them), its
    weights loaded (``strict`` as Lightning), on the saved device or ``map_location``.

    Example::

        model = load_from_checkpoint(MyModel, ckpt.best_model_path)

    Raises:
        ConfigurationError: ``hparams_file`` (the hyperparameters are in the checkpoint).
        CheckpointNotFoundError / CorruptCheckpointError: as :func:`checkpointer.load`.
    """
    if hparams_file is not None:
        raise ConfigurationError("load_from_checkpoint: hparams_file is not supported; pass "
                                 "the hyperparameters to override as keyword arguments")
    checkpoint = SafeCheckpointIO().load_checkpoint(checkpoint_path, map_location)
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    model = _load_state(cls, checkpoint, strict=strict, **kwargs)
    assert isinstance(model, cls)
    return model


class SafeLoading:
    """A mixin giving a ``LightningModule`` a ``load_from_checkpoint`` that reads this
    format (put it first: ``class Net(SafeLoading, pl.LightningModule)``)."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None,
                             hparams_file: Any = None, strict: bool | None = None,
                             **kwargs: Any) -> Any:  # fmt: skip
        """:func:`load_from_checkpoint` of this class."""
        return load_from_checkpoint(cls, checkpoint_path, map_location, hparams_file,  # type: ignore[type-var]
                                    strict, **kwargs)  # fmt: skip
