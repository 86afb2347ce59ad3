"""``SafeCheckpointIO``: Lightning's checkpoint file I/O through this format, never pickle.

Re-exported by :mod:`checkpointer.adapters.lightning`; kept apart so that module stays short.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import fsspec
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

import checkpointer
from checkpointer.errors import ConfigurationError, StateTreeError

from ._torch_codec import decode, encode

__all__ = ["SafeCheckpointIO", "encode_checkpoint", "decode_checkpoint"]

log = logging.getLogger("checkpointer")


def encode_checkpoint(checkpoint: dict[str, Any]) -> Any:
    """Lightning's checkpoint dict as a state tree (tensors to numpy, int keys recorded).

    Raises:
        StateTreeError: a value that is neither an array nor a plain value, e.g. an
            ``argparse.Namespace`` in ``hyper_parameters``; the message names the key.
    """
    try:
        return encode(checkpoint)
    except StateTreeError as exc:
        raise StateTreeError(
            f"Lightning checkpoint: {exc}. Only tensors and plain values can be stored "
            "(nothing is pickled); e.g. save_hyperparameters() of plain values only"
        ) from exc


def _move(node: Any, device: torch.device) -> Any:
    if isinstance(node, torch.Tensor):
        return node.to(device)
    if isinstance(node, dict):
        out = type(node)((k, _move(v, device)) for k, v in node.items())
        if hasattr(node, "_metadata"):
            out._metadata = node._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(node, (list, tuple)):
        items = [_move(v, device) for v in node]
        return items if isinstance(node, list) else tuple(items)
    return node


def decode_checkpoint(tree: Any, map_location: Any = None) -> dict[str, Any]:
    """Invert :func:`encode_checkpoint`: numpy back to (CPU, or ``map_location``) tensors.

    Raises:
        ConfigurationError: ``map_location`` other than ``None``, a device or a device name.
    """
    ckpt: dict[str, Any] = decode(tree, copy=True)
    if map_location is None:
        return ckpt
    if not isinstance(map_location, (str, torch.device)):
        raise ConfigurationError(
            f"SafeCheckpointIO: map_location must be None, a device or a device name, "
            f"got {map_location!r}"
        )
    device = torch.device(map_location)
    moved: dict[str, Any] = ckpt if device.type == "cpu" else _move(ckpt, device)
    return moved


class SafeCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` plugin writing safetensors + msgpack through fsspec.

    ``Trainer(plugins=[SafeCheckpointIO()])`` makes ``trainer.save_checkpoint`` and
    Lightning's own checkpointing write this format, and ``trainer.fit(ckpt_path=...)``
    read it. A checkpoint "file" is a folder (``<path>/manifest.msgpack`` plus
    ``*.safetensors``), replaced atomically.

    Args:
        verify: check every checksum when loading.
        storage_options: passed to fsspec for every path.

    Example::

        trainer = Trainer(plugins=[SafeCheckpointIO()])
        trainer.fit(model)
        trainer.save_checkpoint("final.ckpt")
        trainer.fit(model, ckpt_path="final.ckpt")
    """

    def __init__(
        self, *, verify: bool = True, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.verify = verify
        self.storage_options = storage_options

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` (Lightning's dict) as the checkpoint folder ``path``.

        Raises:
            TypeError: ``storage_options`` given per call (as Lightning's ``TorchCheckpointIO``).
            StateTreeError: a value that cannot be stored, naming its key.
        """
        if storage_options is not None:
            raise TypeError(
                "SafeCheckpointIO.save_checkpoint takes no per-call storage_options; "
                "pass SafeCheckpointIO(storage_options=...) instead"
            )
        checkpointer.save(
            os.fspath(path),
            encode_checkpoint(checkpoint),
            metadata={"writer": "checkpointer.adapters.lightning"},
            storage_options=self.storage_options,
        )

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the checkpoint folder ``path`` into Lightning's dict of tensors.

        ``path`` may also name the folder's ``manifest.msgpack``. ``weights_only`` is
        accepted and ignored: this format never runs code on load.
        """
        url = os.fspath(path)
        if url.endswith("/manifest.msgpack"):  # how a remote last checkpoint is named
            url = url[: -len("/manifest.msgpack")]
        tree = checkpointer.load(url, verify=self.verify, storage_options=self.storage_options)
        return decode_checkpoint(tree, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint folder (or file) at ``path``; absent is fine."""
        fs, root = fsspec.core.url_to_fs(os.fspath(path), **(self.storage_options or {}))
        if fs.exists(root):
            fs.rm(root, recursive=True)
            log.debug("removed checkpoint %s", path)
