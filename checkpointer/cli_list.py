"""``checkpointer ls``, ``inspect`` and ``verify``: what a directory holds, what one
checkpoint holds, and whether every byte is intact.

``ls`` reads every manifest (the index beside the checkpoints is a cache and may be stale):
a checkpoint whose manifest or data files do not check out is marked ``broken`` and is
never ``latest`` or ``best``. Exit codes, as GNU ``ls``: 0 fine, 1 something broken,
2 the directory itself cannot be read.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from .cli_arrays import arrays, dtype_name, values
from .cli_common import Progress, counting, emit_json, options_for, size, table, when
from .errors import CheckpointError, CheckpointNotFoundError, ConfigurationError, ManifestError
from .frame import decode_framed
from .index import (
    INDEX_MAGIC,
    INDEX_NAME,
    Entry,
    decode_entry,
    entry_from_manifest,
    read_index_meta,
)
from .info import CheckpointInfo
from .load import verify_checkpoint
from .manifest import MANIFEST_NAME, read_manifest
from .monitor import Monitor
from .payload import (
    file_entry,
    file_names,
    is_file_checkpoint,
    read_file_manifest,
    sidecar,
    verify_file,
)
from .retention import Record, best_record
from .storage import Store, open_store, split_url
from .tree import unflatten

__all__ = ["Listed", "scan", "open_dir", "open_checkpoint", "checkpoint_names", "monitor_of",
           "score", "cmd_ls", "cmd_inspect", "cmd_verify"]

_MAX_VALUES = 20


@dataclass(frozen=True)
class Listed:
    """One checkpoint folder: what its manifest says (or the index's row for a broken one)
    and why it is broken (``None`` when its manifest and data files check out)."""

    entry: Entry
    broken: str | None = None


def open_dir(args: argparse.Namespace, url: str) -> Store:
    """The store of directory ``url`` with the command's storage options."""
    return open_store(url, options_for(args.storage_option, url))


def checkpoint_names(listing: list[str]) -> list[str]:
    """Folders holding a manifest (hidden ones are the engine's leftovers, not checkpoints),
    and files with a sidecar manifest (:mod:`checkpointer.payload`)."""
    return sorted({p.split("/", 1)[0] for p in listing
                   if p.endswith("/" + MANIFEST_NAME) and not p.startswith(".")} | set(file_names(listing)))


def _listing(store: Store) -> list[str]:
    files = store.list_files()
    if not files and not store.exists(""):
        raise CheckpointNotFoundError(f"{store.url}: no such directory")
    return files


def open_checkpoint(args: argparse.Namespace, url: str) -> tuple[Store, str]:
    """``(store of the parent, name)`` of checkpoint ``url``, which must have a manifest;
    a directory of checkpoints passed instead is named as such, with its checkpoints."""
    parent, name = split_url(url)
    store = open_store(parent, options_for(args.storage_option, url))
    if store.exists(f"{name}/{MANIFEST_NAME}") or is_file_checkpoint(store, name):
        return store, name
    if not store.exists(name):
        raise CheckpointNotFoundError(f"{store.url_of(name)} does not exist")
    below = checkpoint_names(open_dir(args, url).list_files())
    if below:
        shown = ", ".join(below[:5]) + (", ..." if len(below) > 5 else "")
        raise ConfigurationError(f"{url} is a directory of checkpoints, not one checkpoint; "
                                 f"name one of them: {shown}")
    raise CheckpointNotFoundError(f"{store.url_of(name)} is not a checkpoint (no manifest)")


def _index_rows(store: Store, listing: set[str]) -> dict[str, Entry]:
    """The index's rows by name (context for broken checkpoints; never trusted otherwise)."""
    if INDEX_NAME not in listing:
        return {}
    try:
        data = decode_framed(store.read_bytes(INDEX_NAME), INDEX_MAGIC, store.url_of(INDEX_NAME))
    except CheckpointError:
        return {}
    rows = data.get("checkpoints") if isinstance(data, dict) else None
    found = [decode_entry(store, r) for r in rows] if isinstance(rows, list) else []
    return {e.info.name: e for e in found if e is not None}


def _read_one(store: Store, name: str, files: set[str]) -> Entry:
    if sidecar(name) in files:
        return file_entry(store, name)
    m = read_manifest(store, name)
    missing = [f.name for f in m.files if f"{name}/{f.name}" not in files]
    if missing:
        raise ManifestError(f"{store.url_of(name)}: data file {missing[0]} named by the manifest is missing")
    return entry_from_manifest(store, name, m, store.size(f"{name}/{MANIFEST_NAME}"))


def scan(store: Store) -> list[Listed]:
    """Every checkpoint folder of ``store``, oldest first, each manifest read and checked.

    Raises:
        CheckpointNotFoundError: the directory does not exist.
        ConfigurationError: it is a checkpoint itself, not a directory of them.
    """
    listing = _listing(store)
    files = set(listing)
    names = checkpoint_names(listing)
    if not names and MANIFEST_NAME in files:
        raise ConfigurationError(f"{store.url} is a checkpoint, not a directory of checkpoints; "
                                 f"`checkpointer inspect {store.url}` shows it")
    cached = _index_rows(store, files) if names else {}
    out = []
    for name in names:
        try:
            out.append(Listed(_read_one(store, name, files)))
        except CheckpointError as exc:
            bare = Entry(CheckpointInfo(name, store.url_of(name), None, None), -1, False)
            out.append(Listed(cached.get(name, bare), str(exc)))
    out.sort(key=lambda r: (r.entry.seq, r.entry.info.time, r.entry.info.name))
    return out


def monitor_of(args: argparse.Namespace, meta: dict[str, str]) -> Monitor | None:
    """The monitor that marks "best": the command line's, else the index's when usable."""
    metric = args.monitor or meta.get("monitor")
    if not metric:
        return None
    try:
        return Monitor.create(metric, args.mode or meta.get("mode") or "auto")
    except CheckpointError as exc:
        if args.monitor:
            raise
        print(f"checkpointer: warning: the index's monitor is unusable ({exc}); no best marked",
              file=sys.stderr)
        return None


def score(monitor: Monitor | None, metrics: dict[str, Any]) -> float | None:
    try:
        return monitor.extract(metrics) if monitor else None
    except CheckpointError:  # a str or other non-number under the monitored name: unranked
        return None


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):  # a manifest written by someone else: show, do not crash
        return "-" if metrics is None else repr(metrics)[:200]
    if not metrics:
        return "-"
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _num(x: int | None) -> str:
    return "-" if x is None else str(x)


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_dir(args, args.url)
    listed = scan(store)
    monitor = monitor_of(args, read_index_meta(store)) if listed else None
    good = [r.entry for r in listed if r.broken is None]
    best = best_record([Record(e.info.name, e.seq, score(monitor, e.info.metrics), e.managed)
                        for e in good], monitor)
    latest = good[-1].info.name if good else None
    marks = {r.entry.info.name: [m for m, on in (("latest", r.entry.info.name == latest),
                                                 ("best", best is not None and best.name == r.entry.info.name),
                                                 ("broken", r.broken is not None)) if on]
             for r in listed}
    if args.json:
        emit_json({"directory": store.url, "monitor": monitor.metric if monitor else None,
                   "checkpoints": [_ls_json(r, marks[r.entry.info.name]) for r in listed]})
    elif not listed:
        print(f"no checkpoints in {store.url}")
    else:
        rows = [["NAME", "STEP", "EPOCH", "METRICS", "SIZE", "SAVED", "MARKS"]]
        for r in listed:
            i = r.entry.info
            rows.append([i.name, _num(i.step), _num(i.epoch), _fmt_metrics(i.metrics),
                         size(i.nbytes) if r.broken is None else "-", when(i.time),
                         ",".join(marks[i.name])])
        print(table(rows))
        for r in listed:
            if r.broken is not None:
                print(f"broken: {r.entry.info.name}: {r.broken}")
    return 1 if any(r.broken is not None for r in listed) else 0


def _ls_json(r: Listed, marks: list[str]) -> dict[str, Any]:
    i = r.entry.info
    return {"name": i.name, "url": i.url, "step": i.step, "epoch": i.epoch, "metrics": i.metrics,
            "time": i.time or None, "saved": when(i.time) if i.time else None,
            "nbytes": i.nbytes if r.broken is None else None, "managed": r.entry.managed,
            "latest": "latest" in marks, "best": "best" in marks, "broken": r.broken}


def cmd_inspect(args: argparse.Namespace) -> int:
    store, name = open_checkpoint(args, args.checkpoint)
    m = read_file_manifest(store, name) if is_file_checkpoint(store, name) else read_manifest(store, name)
    leaves = arrays(m, store.url_of(name))
    plain = values(m)
    meta = m.get("metadata")
    meta = None if meta is None else unflatten(meta, {})
    if args.json:
        emit_json({"url": store.url_of(name), "library": m.get("library"), "step": m.get("step"),
                   "epoch": m.get("epoch"), "metrics": m.get("metrics"), "time": m.get("time"),
                   "saved": when(m.get("time")), "managed": bool(m.get("managed", False)),
                   "metadata": meta, "nbytes": m.nbytes,
                   "files": [{"name": f.name, "nbytes": f.nbytes} for f in m.files],
                   "arrays": [{"key": a.name, "dtype": dtype_name(a.code), "shape": list(a.shape),
                               "nbytes": a.nbytes, "file": a.file, "pieces": len(a.pieces) or None}
                              for a in leaves],
                   "values": plain})
        return 0
    print(f"checkpoint  {store.url_of(name)}")
    print(f"saved       {when(m.get('time'))}  by {m.get('library') or '?'}"
          f"{'' if m.get('managed') else '  (one-off save, not a manager run)'}")
    print(f"step        {_num(m.get('step'))}")
    print(f"epoch       {_num(m.get('epoch'))}")
    print(f"metrics     {_fmt_metrics(m.get('metrics'))}")
    if meta is not None:
        print(f"metadata    {meta!r:.500}")
    files = ", ".join(f"{f.name} ({size(f.nbytes)})" for f in m.files[:4])
    more = f", and {len(m.files) - 4} more" if len(m.files) > 4 else ""
    print(f"size        {size(m.nbytes)} in {len(m.files)} file{'s' * (len(m.files) != 1)}: {files}{more}")
    _print_values(plain)
    if leaves:
        rows = [["KEY", "DTYPE", "SHAPE", "SIZE", "FILE"]]
        rows += [[a.name, dtype_name(a.code), "x".join(map(str, a.shape)) or "scalar", size(a.nbytes), a.file]
                 for a in leaves]
        print(table(rows))
    else:
        print("no arrays")
    return 0


def _print_values(plain: dict[str, Any]) -> None:
    items = list(plain.items())
    for i, (path, v) in enumerate(items[:_MAX_VALUES]):
        text = repr(v)
        text = text if len(text) <= 80 else text[:77] + "..."
        print(f"{'values' if i == 0 else '':<11} {path or '(root)'} = {text}")
    if len(items) > _MAX_VALUES:
        print(f"{'':<11} ... and {len(items) - _MAX_VALUES} more (inspect --json shows them all)")


def _verify_targets(args: argparse.Namespace) -> list[tuple[Store, str]]:
    url = args.url
    try:
        parent, name = split_url(url)
        store = open_store(parent, options_for(args.storage_option, url))
        if store.exists(f"{name}/{MANIFEST_NAME}") or is_file_checkpoint(store, name):
            return [(store, name)]
    except ConfigurationError:  # a bucket or root: a directory, not a checkpoint
        pass
    store = open_dir(args, url)
    names = checkpoint_names(_listing(store))
    if not names and store.exists(MANIFEST_NAME):
        raise ConfigurationError(f"{url}: cannot verify a checkpoint at the root of a store")
    return [(store, n) for n in names]


def _total(targets: list[tuple[Store, str]]) -> int:
    total = 0
    for store, name in targets:
        try:
            total += read_manifest(store, name).nbytes
        except CheckpointError:
            pass  # reported when it is verified
    return total


def cmd_verify(args: argparse.Namespace) -> int:
    targets = _verify_targets(args)
    if not targets:
        print(f"no checkpoints in {args.url}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    with Progress("verify", enabled=args.progress) as bar:
        if bar.wanted:
            bar.start(_total(targets))
        for store, name in targets:
            try:
                check = verify_file if is_file_checkpoint(store, name) else verify_checkpoint
                m = check(counting(store, bar), name)
                results.append({"name": name, "url": store.url_of(name), "ok": True, "error": None,
                                "nbytes": m.nbytes})
            except CheckpointError as exc:
                results.append({"name": name, "url": store.url_of(name), "ok": False, "error": str(exc),
                                "nbytes": None})
            if not args.json:
                r = results[-1]
                bar.print(f"ok      {r['url']}  ({size(r['nbytes'])})" if r["ok"] else f"FAILED  {r['url']}: {r['error']}")
    failed = sum(not r["ok"] for r in results)
    if args.json:
        emit_json({"checkpoints": results, "verified": len(results) - failed, "failed": failed})
    else:
        print(f"{len(results) - failed} verified, {failed} failed")
    return 1 if failed else 0
