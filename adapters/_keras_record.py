"""The record kept beside Keras-format checkpoints: the best score and the files written.

Keras's own ``ModelCheckpoint`` forgets its best score when the process ends, so a restarted
run overwrites a good model with a worse one. This JSON document (``<file>.ckpt-best.json``,
the template's fields removed from the name) remembers the monitored metric, its mode, the
best value with its file, and every file the callback wrote, oldest first; ``keep_last`` /
``keep_best`` retention works from it. Improvement and ranking come from
:class:`checkpointer.monitor.Monitor`; this module only stores and selects.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from checkpointer.monitor import Monitor
from checkpointer.retention import Record, Retention

from . import _keras_files as files

__all__ = ["RECORD_SUFFIX", "record_url", "FileEntry", "FileRecord"]

RECORD_SUFFIX = ".ckpt-best.json"
_FIELD = re.compile(r"\{[^{}]*\}")
_log = logging.getLogger("checkpointer")


def record_url(template: str) -> str:
    """Where the record of the filepath ``template`` lives: its fields removed, plus a suffix.

    >>> record_url("ckpt/model_{epoch:02d}.keras")
    'ckpt/model_.keras.ckpt-best.json'
    """
    return _FIELD.sub("", template) + RECORD_SUFFIX


@dataclass
class FileEntry:
    """One file the callback wrote: its URL, monitored value (None: missing/NaN), position."""

    url: str
    value: float | None
    epoch: int
    batch: int | None = None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class FileRecord:
    """Best score and written files for one filepath template, persisted as JSON."""

    def __init__(
        self, template: str, monitor: Monitor | None, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.url = record_url(template)
        self.monitor = monitor
        self.storage_options = storage_options
        self.best: FileEntry | None = None
        self.entries: list[FileEntry] = []

    def load(self) -> bool:
        """Read the record from storage; ``False`` when there is none usable."""
        doc = files.read_json(self.url, self.storage_options)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            return False
        try:
            self.entries = [FileEntry(**e) for e in doc.get("files", [])]
            best = FileEntry(**doc["best"]) if doc.get("best") else None
        except TypeError:
            _log.warning("ignoring unreadable checkpoint record %s", self.url)
            return False
        m = self.monitor
        if best is not None and (
            m is None or doc.get("monitor") != m.metric or doc.get("mode") != m.mode
        ):
            _log.warning(
                "checkpoint record %s ranks %r (%s); this callback monitors %r: "
                "its best is not reused",
                self.url,
                doc.get("monitor"),
                doc.get("mode"),
                None if m is None else m.metric,
            )
            best = None
        if best is not None and not files.exists(best.url, self.storage_options):
            _log.warning(
                "the best checkpoint %s named by %s is gone; starting without a best",
                best.url,
                self.url,
            )
            best = None
        self.best = best
        return True

    def save(self) -> None:
        """Write the record atomically."""
        m = self.monitor
        doc = {
            "version": 1,
            "monitor": None if m is None else m.metric,
            "mode": None if m is None else m.mode,
            "best": None if self.best is None else asdict(self.best),
            "files": [asdict(e) for e in self.entries],
        }
        files.write_json(self.url, doc, self.storage_options)

    def add(self, entry: FileEntry, *, is_best: bool) -> None:
        """Note a committed file (replacing an entry of the same URL) and maybe the new best."""
        entry.value = _finite(entry.value)
        self.entries = [e for e in self.entries if e.url != entry.url] + [entry]
        if is_best:
            self.best = entry
        elif self.best is not None and self.best.url == entry.url:
            self.best = None  # its bytes were just replaced by a model that is not the best

    def select_deletions(self, keep_last: int | None, keep_best: int | None) -> list[FileEntry]:
        """Entries the core retention policy drops (``last keep_last ∪ best keep_best``,
        never the newest or the best); with both limits unset nothing is deleted."""
        records = [Record(e.url, seq, e.value) for seq, e in enumerate(self.entries)]
        protected = {self.best.url} if self.best is not None else set()
        drop = set(Retention(keep_last, keep_best).to_delete(records, self.monitor, protected))
        return [e for e in self.entries if e.url in drop]

    def apply_retention(self, keep_last: int | None, keep_best: int | None) -> list[str]:
        """Delete the files retention drops (only files this record lists); their URLs."""
        gone = []
        for entry in self.select_deletions(keep_last, keep_best):
            files.remove(entry.url, self.storage_options)
            gone.append(entry.url)
        self.entries = [e for e in self.entries if e.url not in gone]
        return gone
