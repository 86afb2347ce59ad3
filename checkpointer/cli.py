"""The ``checkpointer`` command: ``demo``, ``ls``, ``inspect``, ``verify``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .demo import run_demo
from .errors import CheckpointError
from .index import load_entries, read_index_meta
from .load import verify_checkpoint
from .manifest import MANIFEST_NAME, read_manifest
from .monitor import Monitor
from .retention import Record, best_record
from .storage import Store, open_store, split_url
from .tree import unflatten
from .version import LIBRARY

__all__ = ["main"]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):  # a manifest written by someone else: show, do not crash
        return repr(metrics)[:200]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _monitor(args: argparse.Namespace, meta: dict[str, str]) -> Monitor | None:
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


def _score(monitor: Monitor | None, metrics: dict[str, Any]) -> float | None:
    try:
        return monitor.extract(metrics) if monitor else None
    except CheckpointError:  # a str or other non-number under the monitored name: unranked
        return None


def _is_checkpoint(url: str) -> tuple[Store, str] | None:
    parent, name = split_url(url)
    store = open_store(parent)
    return (store, name) if store.exists(f"{name}/{MANIFEST_NAME}") else None


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args.url)
    entries, _ = load_entries(store, store.list_files())
    if not entries:
        print(f"no checkpoints in {store.url}")
        return 0
    monitor = _monitor(args, read_index_meta(store))
    records = [Record(e.info.name, e.seq, _score(monitor, e.info.metrics), e.managed) for e in entries]
    best = best_record(records, monitor)
    rows = [["NAME", "STEP", "EPOCH", "METRICS", "SIZE", ""]]
    for e in entries:
        marks = [m for m, on in (("latest", e is entries[-1]), ("best", best and best.name == e.info.name)) if on]
        rows.append([e.info.name, "-" if e.info.step is None else str(e.info.step),
                     "-" if e.info.epoch is None else str(e.info.epoch), _fmt_metrics(e.info.metrics),
                     _size(e.info.nbytes), ",".join(marks)])
    print(_table(rows))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    parent, name = split_url(args.checkpoint)
    store = open_store(parent)
    m = read_manifest(store, name)
    print(f"checkpoint  {store.url_of(name)}")
    for key in ("library", "step", "epoch", "time"):
        print(f"{key:<11} {m.get(key)}")
    print(f"metrics     {_fmt_metrics(m.get('metrics', {}))}")
    if m.get("metadata") is not None:
        print(f"metadata    {unflatten(m.get('metadata'), {})!r}")
    print(f"files       {', '.join(f'{f.name} ({_size(f.nbytes)})' for f in m.files)}")
    rows = [["KEY", "DTYPE", "SHAPE", "BYTES", "FILE"]]
    rows += [[t.key, t.dtype, "x".join(map(str, t.shape)) or "scalar", str(t.nbytes), t.file] for t in m.tensors]
    print(_table(rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    target = _is_checkpoint(args.url)
    if target is not None:
        stores = [target]
    else:
        store = open_store(args.url)
        names = sorted({p.split("/", 1)[0] for p in store.list_files()
                        if p.endswith("/" + MANIFEST_NAME) and not p.startswith(".")})
        stores = [(store, n) for n in names]
        if not names:
            print(f"no checkpoints in {store.url}", file=sys.stderr)
            return 1
    failed = 0
    for store, name in stores:
        try:
            verify_checkpoint(store, name)
            print(f"ok      {store.url_of(name)}")
        except CheckpointError as exc:
            failed += 1
            print(f"FAILED  {store.url_of(name)}: {exc}")
    print(f"{len(stores) - failed} verified, {failed} failed")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo's two runs, then ``ls`` and ``verify`` of what they left."""
    run_demo(args.directory, epochs=args.epochs, interrupt_at=args.interrupt_at)
    print(f"== checkpointer ls {args.directory}")
    cmd_ls(argparse.Namespace(url=args.directory, monitor=None, mode=None))
    print(f"== checkpointer verify {args.directory}")
    return cmd_verify(argparse.Namespace(url=args.directory))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``checkpointer`` console script."""
    p = argparse.ArgumentParser(prog="checkpointer", description=(
        "List, inspect and verify checkpoints written by checkpointer-engine "
        "(safetensors + msgpack manifest), locally or on any fsspec URL."))
    p.add_argument("--version", action="version", version=LIBRARY)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small numpy model, interrupt it, resume, list the checkpoints")
    d.add_argument("directory", nargs="?", default="demo-checkpoints")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--interrupt-at", type=int, default=5)
    d.set_defaults(fn=cmd_demo)
    ls = sub.add_parser("ls", help="table of the checkpoints in a directory: name, step, epoch, metrics, size, latest/best")
    ls.add_argument("url")
    ls.add_argument("--monitor", help="metric that ranks 'best' (default: the manager's, from the index)")
    ls.add_argument("--mode", choices=["min", "max", "auto"])
    ls.set_defaults(fn=cmd_ls)
    ins = sub.add_parser("inspect", help="tensors (key, dtype, shape, bytes) and metadata of one checkpoint")
    ins.add_argument("checkpoint")
    ins.set_defaults(fn=cmd_inspect)
    ver = sub.add_parser("verify", help="check every checksum of one checkpoint or of a whole directory")
    ver.add_argument("url")
    ver.set_defaults(fn=cmd_verify)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except CheckpointError as exc:
        print(f"checkpointer: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `checkpointer ls ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
