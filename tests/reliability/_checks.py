"""The checks every reliability test ends with: a directory, opened fresh, holds only
committed checkpoints that verify, and nothing else of the engine's.

Run as a script (``python _checks.py SPEC_JSON``) it performs :func:`check_directory` in a
fresh process for every directory in the spec and prints a JSON summary.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import checkpointer
from checkpointer import CheckpointManager
from checkpointer.index import INDEX_NAME
from checkpointer.manifest import MANIFEST_NAME, read_manifest
from checkpointer.storage import Store, open_store


def engine_leftovers(store: Store, names: list[str]) -> list[str]:
    """Everything in ``store`` that is neither a listed checkpoint's file nor the index.

    A listed checkpoint's folder must hold its manifest and exactly the data files it names.
    """
    entries = store.list_files()
    files = {p for p in entries if not p.endswith("/")}
    # Object stores have no empty folders (local disk used as one may keep some: harmless).
    tops = {p.split("/", 1)[0] for p in (entries if store.atomic_rename else files) if "/" in p}
    wanted = {INDEX_NAME}
    for name in names:
        wanted.add(f"{name}/{MANIFEST_NAME}")
        wanted.update(f"{name}/{f.name}" for f in read_manifest(store, name).files)
    extra = sorted(files - wanted) + sorted(f"{t}/" for t in tops - set(names) - {INDEX_NAME})
    missing = sorted(wanted - files - {INDEX_NAME})
    return extra + [f"MISSING {m}" for m in missing]


def multipart_leftovers(store: Store) -> list[str]:
    """Unfinished multipart uploads under an ``s3://`` store (``[]`` elsewhere)."""
    fs = getattr(store, "fs", None)
    if fs is None or "s3" not in getattr(fs, "protocol", ()):
        return []
    bucket, _, prefix = store.root.partition("/")
    out = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
    return [u["Key"] for u in out.get("Uploads", [])]


def check_directory(
    url: str, manager_kwargs: dict[str, Any], check_state: Any = None
) -> dict[str, int]:
    """Open ``url`` with a fresh manager (its cleanup runs) and check the promise.

    ``restore("latest")`` and ``restore("best")`` succeed without fallback, every listed
    checkpoint verifies (and passes ``check_state(state, step)`` when given), and no
    leftover of the engine remains. Returns counts; raises AssertionError on a breach.
    """
    storage_options = manager_kwargs.get("storage_options")
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpointer.CheckpointWarning)
        with CheckpointManager(url, **manager_kwargs) as mgr:
            infos = mgr.checkpoints
            if infos:
                latest = mgr.restore("latest", fallback=False)
                assert latest.info.name == infos[-1].name
                if check_state is not None:
                    check_state(latest.state, latest.info.step)
                if manager_kwargs.get("monitor"):
                    best = mgr.restore("best", fallback=False)
                    assert mgr.best is not None and best.info.name == mgr.best.name
            for info in infos:
                state = checkpointer.load(info.url, storage_options=storage_options)
                if check_state is not None:
                    check_state(state, info.step)
    store = open_store(url, storage_options)
    left = engine_leftovers(store, [i.name for i in infos]) + multipart_leftovers(store)
    assert not left, f"{url}: leftovers after cleanup: {left}"
    return {"checkpoints": len(infos)}


def main() -> None:
    """Check every directory of the spec given as the first argument; print counts."""
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["here"])
    from _saver import check_state

    total = 0
    for item in spec["directories"]:
        total += check_directory(item["url"], item["kwargs"], check_state)["checkpoints"]
    print(json.dumps({"directories": len(spec["directories"]), "checkpoints": total}))


if __name__ == "__main__":
    main()
