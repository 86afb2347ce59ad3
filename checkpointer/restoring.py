"""``CheckpointManager.restore`` carried out: load the candidates in order (see
:func:`~checkpointer.plan.restore_order`), falling back past broken ones when allowed.

With several processes every rank loads its own part and all agree on each outcome, so
that every rank returns the same checkpoint or raises the same error.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

from . import collective
from .distributed import Coordinator
from .errors import CheckpointError, CheckpointNotFoundError, InsufficientMemoryError
from .hints import restore_not_found
from .info import Checkpoint, CheckpointInfo
from .load import load_checkpoint
from .payload import is_file_checkpoint
from .plan import CheckpointWarning, Scored
from .sharding import ShardSpec
from .storage import Store

__all__ = ["load_first"]

log = logging.getLogger("checkpointer")


def load_first(store: Store, coord: Coordinator, which: str | int, candidates: Sequence[Scored],
               can_fall_back: bool, *, fallback: bool, verify: bool,
               specs: dict[str, ShardSpec] | None, listed: Sequence[CheckpointInfo]) -> Checkpoint:
    """The first of ``candidates`` that loads; past a broken one (warned, naming it) only
    when both ``fallback`` and ``can_fall_back``. ``listed``: every checkpoint there, for the
    message when nothing matches.

    Raises:
        CheckpointNotFoundError: nothing matches ``which`` (or nothing verifies).
        CorruptCheckpointError: the checkpoint asked for fails verification.
    """
    files = []  # file checkpoints (checkpointer.payload): a framework reads those, not restore
    for entry in candidates:
        error: BaseException | None = None
        tree: Any = None
        try:
            tree, _ = load_checkpoint(store, entry.info.name, verify=verify, specs=specs)
        except (CheckpointError, OSError) as exc:
            error = exc
        if coord.world_size > 1:
            error = collective.agree(coord, error)
        if error is None:
            log.info("restored %s", entry.info.url)
            return Checkpoint(entry.info, tree)
        if is_file_checkpoint(store, entry.info.name):  # not broken: skipped, or said so
            files.append(entry.info.url)
            if fallback and can_fall_back:
                continue
            raise CheckpointNotFoundError(_FILES.format(entry.info.url)) from error
        if not (fallback and can_fall_back) or isinstance(error, InsufficientMemoryError):
            raise error  # a memory shortage is not the checkpoint's fault: no fallback
        msg = f"checkpoint {entry.info.url} is broken ({error}); falling back"
        log.warning(msg)
        warnings.warn(msg, CheckpointWarning, stacklevel=3)  # at restore's caller
    if files:
        raise CheckpointNotFoundError(_FILES.format(", ".join(files)))
    raise restore_not_found(store.url, which, listed, bool(candidates))


_FILES = ("restore() reads state checkpoints; {} is one file a payload writer wrote (a framework's own "
          "format, e.g. Keras's .weights.h5): read it with that framework, e.g. model.load_weights(info.url)")
