"""Helpers of :mod:`checkpointer.adapters.lightning`: option checks, names, metrics, where
the checkpoints live, and the Lightning-facing attributes computed from the manager's list
or restored from a saved callback state."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import fsspec
import lightning.pytorch as pl
import torch

from checkpointer import CheckpointInfo
from checkpointer.errors import ConfigurationError
from checkpointer.monitor import Monitor
from checkpointer.naming import format_name
from checkpointer.paths import join_url
from checkpointer.schedule import Schedule

__all__ = [
    "Once",
    "lightning_template",
    "last_name",
    "scalar_metrics",
    "check_options",
    "step_schedule",
    "absolute_dirpath",
    "resolve_dirpath",
    "find_last",
    "ranked",
    "summarize",
    "apply_summary",
    "restore_attributes",
]

log = logging.getLogger("checkpointer")

_UNSET = object()
MANIFEST = "manifest.msgpack"


class Once:
    """A state factory that dumps the trainer at most once per save point."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.value = fn, _UNSET

    def __call__(self) -> Any:
        if self.value is _UNSET:
            self.value = self.fn()
        return self.value


def lightning_template(filename: str | None, auto_insert: bool) -> str:
    """Lightning's ``{epoch}-{val_loss:.2f}`` as a core template (``epoch={epoch}-...``)."""
    template = filename or "{epoch}-{step}"
    if auto_insert:
        for group in re.findall(r"(\{.*?)[:\}]", template):
            template = template.replace(group, group[1:] + "=" + "{" + group[1:])
    return template


def last_name(template: str, extension: str, metrics: Mapping[str, float]) -> str:
    """The last checkpoint's name: Lightning's ``CHECKPOINT_NAME_LAST`` template filled from
    ``metrics`` (``epoch`` and ``step`` as integers, 0 when absent), plus ``extension``."""
    return (
        format_name(
            template,
            epoch=int(metrics.get("epoch", 0)),
            step=int(metrics.get("step", 0)),
            metrics=metrics,
        )
        + extension
    )


def scalar_metrics(candidates: Mapping[str, Any]) -> dict[str, float]:
    """The candidates that are numbers or one-element tensors, as floats (others cannot be
    metrics)."""
    return {
        k: float(v)
        for k, v in candidates.items()
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
    }


def check_options(
    save_top_k: Any,
    monitor: Any,
    mode: Any,
    save_last: Any,
    every_n_train_steps: Any,
    every_n_epochs: Any,
    train_time_interval: Any,
) -> None:
    """Lightning's constructor checks, raised as ConfigurationError (a ValueError)."""
    if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
        raise ConfigurationError(f"save_top_k must be an int >= -1, got {save_top_k!r}")
    if mode not in ("min", "max"):
        raise ConfigurationError(f"mode must be 'min' or 'max', got {mode!r}")
    if save_last not in (None, True, False, "link"):
        raise ConfigurationError(f"save_last must be a bool, None or 'link', got {save_last!r}")
    for name, value in (
        ("every_n_train_steps", every_n_train_steps),
        ("every_n_epochs", every_n_epochs),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ConfigurationError(f"{name} must be an int >= 0 or None, got {value!r}")
    if train_time_interval is not None and not isinstance(train_time_interval, timedelta):
        raise ConfigurationError(
            f"train_time_interval must be a timedelta, got {train_time_interval!r}"
        )
    if sum([bool(every_n_train_steps), bool(every_n_epochs), train_time_interval is not None]) > 1:
        raise ConfigurationError(
            f"every_n_train_steps={every_n_train_steps}, every_n_epochs={every_n_epochs} and "
            f"train_time_interval={train_time_interval} are mutually exclusive"
        )
    if monitor is None and save_top_k not in (-1, 0, 1):
        raise ConfigurationError(f"save_top_k={save_top_k} needs a monitor to rank by")


def step_schedule(every_n_train_steps: int, train_time_interval: timedelta | None) -> Schedule:
    """The core schedule of the step and time save points (0 steps: none; an interval is
    at least a nanosecond)."""
    return Schedule(
        None,
        every_n_train_steps or None,
        None if train_time_interval is None else max(train_time_interval.total_seconds(), 1e-9),
    )


def absolute_dirpath(dirpath: str | os.PathLike[str] | None) -> str | None:
    """The ``dirpath`` argument as a string, a local one absolute (``~`` expanded, links
    resolved, as Lightning does); a URL as it is."""
    path = None if dirpath is None else os.fspath(dirpath)
    if path and "://" not in path:
        path = os.path.realpath(os.path.expanduser(path))
    return path


def resolve_dirpath(trainer: pl.Trainer, dirpath: str | None) -> str:
    """``dirpath`` or Lightning's default: the first logger's folder, else the root dir."""
    if dirpath is not None:
        return dirpath
    if trainer.loggers:
        lg, many = trainer.loggers[0], len(trainer.loggers) > 1
        save_dir = lg.save_dir or trainer.default_root_dir
        name = "_".join(dict.fromkeys(str(x.name) for x in trainer.loggers)) if many else lg.name
        version: Any = (
            "_".join(dict.fromkeys(str(x.version) for x in trainer.loggers)) if many else lg.version
        )
        version = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(str(save_dir), str(name), version, "checkpoints")
    return os.path.join(str(trainer.default_root_dir), "checkpoints")


def find_last(dirpath: str, last_template: str, storage_options: dict[str, Any] | None) -> set[str]:
    """Committed checkpoints of ``dirpath`` named like Lightning's last checkpoint."""
    fs, root = fsspec.core.url_to_fs(dirpath, **(storage_options or {}))
    if not fs.exists(root):
        return set()
    parts = re.split(r"\{[^}]*\}", last_template)
    pattern = re.compile("^" + ".*?".join(map(re.escape, parts)) + r"(-(\d+))?\.ckpt$")
    found = set()
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if pattern.match(base) and fs.exists(join_url(path, MANIFEST)):
            # Lightning asks fs.modified() of each candidate, which object stores answer for
            # files only: remotely, name the manifest (SafeCheckpointIO maps it back).
            remote = "://" in dirpath and not dirpath.startswith("file://")
            found.add(join_url(dirpath, base, MANIFEST if remote else ""))
    return found


def ranked(checkpoints: Sequence[CheckpointInfo], monitor: Monitor) -> list[tuple[str, float]]:
    """``(url, score)`` of the checkpoints carrying the monitored metric, best first; ties
    keep the older first (the list is oldest first and the sort is stable)."""
    scored = [(c.url, monitor.extract(c.metrics)) for c in checkpoints]
    pairs = [(u, v) for u, v in scored if v is not None]
    return sorted(pairs, key=lambda p: monitor.sort_key(p[1]))


def summarize(
    checkpoints: Sequence[CheckpointInfo],
    monitor: Monitor | None,
    save_top_k: int,
    current: float | None,
    newest: str,
    last: str,
    last_saved: str,
) -> dict[str, Any]:
    """The Lightning-facing attributes as plain values (broadcastable to every rank)."""
    out: dict[str, Any] = {
        "last_model_path": last,
        "last_saved": last_saved,
        "current_score": current,
    }
    if monitor is None:
        if newest:
            out["best_model_path"] = newest
        return out
    top = ranked(checkpoints, monitor)
    out["best_k_models"] = dict(top)
    if top:
        out["best_model_path"], out["best_model_score"] = top[0]
        if save_top_k > 0 and len(top) >= save_top_k:
            out["kth_best_model_path"], out["kth_value"] = top[-1]
    return out


def apply_summary(cb: Any, summary: dict[str, Any] | None) -> None:
    """Set ``cb``'s attributes from :func:`summarize` (scores as tensors, as Lightning)."""
    if not summary:
        return

    def tensor(v: float | None) -> torch.Tensor | None:
        return None if v is None else torch.tensor(float(v))

    cb.last_model_path = summary["last_model_path"]
    cb._last_checkpoint_saved = summary["last_saved"]
    if summary["current_score"] is not None:
        cb.current_score = tensor(summary["current_score"])
    if "best_model_path" in summary:
        cb.best_model_path = summary["best_model_path"]
    if "best_k_models" in summary:
        cb.best_k_models = {k: tensor(v) for k, v in summary["best_k_models"].items()}
        if "best_model_score" in summary:
            cb.best_model_score = tensor(summary["best_model_score"])
    if "kth_best_model_path" in summary:
        cb.kth_best_model_path = summary["kth_best_model_path"]
        cb.kth_value = tensor(summary["kth_value"])


def restore_attributes(cb: Any, state_dict: Mapping[str, Any]) -> None:
    """Set ``cb``'s attributes from its saved ``state_dict``, as Lightning does: all of them
    when it was saved for the same ``dirpath``, else only ``best_model_path`` (with a warning)."""
    if state_dict.get("dirpath", cb.dirpath) == cb.dirpath:
        cb.best_model_score = state_dict["best_model_score"]
        cb.kth_best_model_path = state_dict.get("kth_best_model_path", cb.kth_best_model_path)
        cb.kth_value = state_dict.get("kth_value", cb.kth_value)
        cb.best_k_models = dict(state_dict.get("best_k_models", cb.best_k_models))
        cb.last_model_path = state_dict.get("last_model_path", cb.last_model_path)
        cb.current_score = state_dict.get("current_score", cb.current_score)
    else:
        log.warning(
            "dirpath changed from %r to %r: only best_model_path is restored",
            state_dict.get("dirpath"),
            cb.dirpath,
        )
    cb.best_model_path = state_dict["best_model_path"]
