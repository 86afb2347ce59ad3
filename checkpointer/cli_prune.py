"""``checkpointer prune URL``: delete the checkpoints a retention policy does not keep, and
say why each of the others stays.

The decision is the core's (:meth:`~checkpointer.retention.Retention.explain`), over every
manifest read afresh (the index is a cache: nothing is deleted on its word). Never deleted:
the latest and the best checkpoint, anything the engine's manager did not write (a one-off
``checkpointer.save``, a ``convert``: manifest field ``managed`` false), and any folder whose
manifest does not read (it is reported as broken). Each manifest is read once more right
before its checkpoint goes, and :func:`~checkpointer.commit.remove_checkpoint` keeps files
the engine did not write. ``--dry-run`` deletes nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cli_common import Progress, emit_json, size, table
from .cli_list import Listed, monitor_of, open_dir, scan, score
from .commit import remove_checkpoint
from .errors import CheckpointError, ConfigurationError
from .index import read_index_meta
from .manifest import read_manifest
from .monitor import Monitor
from .retention import Record, Retention
from .storage import Store

__all__ = ["cmd_prune"]


def _policy(args: argparse.Namespace, monitor: Monitor | None) -> Retention:
    if args.keep_last is None and args.keep_best is None:
        raise ConfigurationError("prune needs --keep-last N and/or --keep-best K (with --monitor): "
                                 "without them everything is kept")
    if args.keep_best is not None and monitor is None:
        raise ConfigurationError("--keep-best needs --monitor METRIC (the directory's index names no monitor)")
    return Retention(keep_last=args.keep_last, keep_best=args.keep_best,
                     keep_every_n_steps=args.keep_every_n_steps,
                     keep_every_n_epochs=args.keep_every_n_epochs)


def _still_deletable(store: Store, name: str) -> str | None:
    """Why checkpoint ``name`` must not go after all (its manifest, read again now, does not
    read or says another writer), else ``None``."""
    try:
        m = read_manifest(store, name)
    except CheckpointError as exc:
        return f"not deleted: its manifest no longer reads ({exc})"
    return None if m.get("managed") is True else "not deleted: not written by this engine's manager"


def _decide(args: argparse.Namespace, store: Store, listed: list[Listed]
            ) -> tuple[dict[str, list[str]], Monitor | None]:
    monitor = monitor_of(args, read_index_meta(store))
    policy = _policy(args, monitor)
    records = [Record(e.info.name, e.seq, score(monitor, e.info.metrics), e.managed,
                      e.info.step, e.info.epoch, e.info.time)
               for e in (r.entry for r in listed if r.broken is None)]
    why = policy.explain(records, monitor)
    for r in listed:
        if r.broken is not None:
            why[r.entry.info.name] = [f"broken, left for you to look at: {r.broken}"]
    return why, monitor


def _delete(store: Store, doomed: list[Listed], why: dict[str, list[str]], bar: Progress
            ) -> tuple[list[str], dict[str, list[str]]]:
    gone: list[str] = []
    left: dict[str, list[str]] = {}
    bar.start(sum(r.entry.info.nbytes for r in doomed))
    for r in doomed:
        name = r.entry.info.name
        refused = _still_deletable(store, name)
        if refused is not None:
            why[name] = [refused]
            continue
        left[name] = remove_checkpoint(store, name)
        gone.append(name)
        bar.update(r.entry.info.nbytes)
    return gone, left


def cmd_prune(args: argparse.Namespace) -> int:
    store = open_dir(args, args.url)
    listed = scan(store)
    if not listed:
        print(f"no checkpoints in {store.url}")
        return 0
    why, monitor = _decide(args, store, listed)
    doomed = [r for r in listed if not why[r.entry.info.name]]
    gone: list[str] = []
    left: dict[str, list[str]] = {}
    if not args.dry_run:
        with Progress("prune", enabled=args.progress) as bar:
            gone, left = _delete(store, doomed, why, bar)
    freed = sum(r.entry.info.nbytes for r in doomed if r.entry.info.name in gone or args.dry_run)
    if args.json:
        emit_json(_json(store, listed, why, gone, left, monitor, args.dry_run, freed))
    else:
        _print(listed, why, gone, left, args.dry_run, freed)
    return 1 if any(r.broken is not None for r in listed) else 0


def _action(name: str, why: dict[str, list[str]], gone: list[str], dry_run: bool) -> str:
    if why[name]:
        return "keep"
    return "would delete" if dry_run else ("deleted" if name in gone else "keep")


def _print(listed: list[Listed], why: dict[str, list[str]], gone: list[str],
           left: dict[str, list[str]], dry_run: bool, freed: int) -> None:
    rows = [["NAME", "STEP", "EPOCH", "ACTION", "WHY"]]
    for r in listed:
        i = r.entry.info
        rows.append([i.name, "-" if i.step is None else str(i.step), "-" if i.epoch is None else str(i.epoch),
                     _action(i.name, why, gone, dry_run), ", ".join(why[i.name]) or "no rule keeps it"])
    print(table(rows))
    for name, files in left.items():
        if files:
            print(f"{name}: left the files the engine did not write: {', '.join(files)}")
    kept = sum(1 for r in listed if why[r.entry.info.name])
    if dry_run:
        n = len(listed) - kept
        print(f"dry run: would delete {n} checkpoint{'s' * (n != 1)} ({size(freed)}), keep {kept}; "
              "nothing was deleted")
    else:
        print(f"deleted {len(gone)} checkpoint{'s' * (len(gone) != 1)} ({size(freed)}), kept {kept}")


def _json(store: Store, listed: list[Listed], why: dict[str, list[str]], gone: list[str],
          left: dict[str, list[str]], monitor: Monitor | None, dry_run: bool, freed: int) -> Any:
    return {"directory": store.url, "dry_run": dry_run, "monitor": monitor.metric if monitor else None,
            "checkpoints": [{"name": r.entry.info.name, "step": r.entry.info.step,
                             "epoch": r.entry.info.epoch, "metrics": r.entry.info.metrics,
                             "kept": bool(why[r.entry.info.name]), "reasons": why[r.entry.info.name],
                             "deleted": r.entry.info.name in gone,
                             "left_files": left.get(r.entry.info.name, []), "broken": r.broken}
                            for r in listed],
            "deleted": len(gone), "freed_bytes": freed}
