"""Child of the concurrent-writer test: save ``count`` times into a shared directory.

``python _writer.py SPEC_JSON`` where the spec holds ``directory``, ``writer`` (an id),
``filename`` (a template or null), ``count``, ``start`` (a wall-clock time to begin at, so
that the writers overlap) and optional ``storage_options``. Each save either commits or
fails with a ``CheckpointError``; anything else exits non-zero. Prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from checkpointer import CheckpointError, CheckpointManager


def state(writer: int, step: int) -> dict[str, object]:
    """What writer ``writer`` saves at ``step``; the checker recomputes it."""
    return {"writer": writer, "step": step, "w": np.full(20000, writer * 1000 + step, np.float32)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    kw = {"storage_options": spec["storage_options"]} if spec.get("storage_options") else {}
    mgr = CheckpointManager(spec["directory"], filename=spec["filename"], **kw)
    time.sleep(max(0.0, spec["start"] - time.time()))
    ok, errors = 0, []
    for step in range(spec["count"]):
        try:
            mgr.save(state(spec["writer"], step), step=step, epoch=spec["writer"])
            ok += 1
        except CheckpointError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"ok": ok, "errors": errors}))


if __name__ == "__main__":
    main()
