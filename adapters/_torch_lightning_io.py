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
from checkpointer.removal import remove_checkpoint
from checkpointer.storage import open_store, split_url

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


def _stored(path: Any) -> str:
    """Where ``path`` is stored: a leading dot (reserved for the engine's temporary folders)
    becomes ``_.``."""
    url = os.fspath(path)
    head, sep, base = url.rstrip("/").rpartition("/")
    return f"{head}{sep}_{base}" if base.startswith(".") else url


def _scores(checkpoint: dict[str, Any]) -> dict[str, float]:
    """Each ``ModelCheckpoint`` state's monitored metric and its current score."""
    out: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get("monitor"), str):
            score = state.get("current_score")
            if isinstance(score, (int, float, torch.Tensor)) and torch.as_tensor(score).numel() == 1:
                out[state["monitor"]] = float(score)
    return out


class SafeCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` plugin writing safetensors + msgpack through fsspec.

    ``Trainer(plugins=[SafeCheckpointIO()])`` makes ``trainer.save_checkpoint`` and
    Lightning's own checkpointing write this format, and ``trainer.fit(ckpt_path=...)``
    read it. A checkpoint "file" is a folder (``<path>/manifest.msgpack`` plus
    ``*.safetensors``), replaced atomically; its manifest records the step, the epoch and
    each ``ModelCheckpoint``'s monitored score (``checkpointer ls`` shows them). A name
    with a leading dot (Lightning's ``.temp.ckpt`` under ``ddp_spawn``; such names are the
    engine's own temporary folders) is stored as ``_.<name>``.

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
            _stored(path),
            encode_checkpoint(checkpoint),
            metadata={"writer": "checkpointer.adapters.lightning"},
            storage_options=self.storage_options,
            step=checkpoint.get("global_step"),
            epoch=checkpoint.get("epoch"),
            metrics=_scores(checkpoint),
        )

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read the checkpoint folder ``path`` into Lightning's dict of tensors.

        ``path`` may also name the folder's ``manifest.msgpack``. ``weights_only`` is
        accepted and ignored: this format never runs code on load.
        """
        url = _stored(path)
        if url.endswith("/manifest.msgpack"):  # how a remote last checkpoint is named
            url = url[: -len("/manifest.msgpack")]
        tree = checkpointer.load(url, verify=self.verify, storage_options=self.storage_options)
        return decode_checkpoint(tree, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` with the core's safe delete (renamed aside or
        manifest first; files the engine did not write stay); a link or a plain file is
        just removed; absent is fine."""
        url = _stored(path)
        fs, root = fsspec.core.url_to_fs(url, **(self.storage_options or {}))
        if os.path.islink(root) or (fs.exists(root) and not fs.isdir(root)):
            fs.rm_file(root)  # save_last="link"'s link (never what it points to), or a file
        elif fs.exists(root):
            parent, name = split_url(url)
            remove_checkpoint(open_store(parent, self.storage_options), name)
        log.debug("removed checkpoint %s", path)
