"""The ``checkpointer`` command: its arguments, and what every command's failure looks like.

The commands live in ``cli_list`` (``ls``, ``inspect``, ``verify``), ``cli_diff`` (``diff``),
``cli_export`` (``export``), ``cli_convert`` (``convert``) and ``cli_prune`` (``prune``).

Exit codes: 0 done; 1 done, and the answer is "no" (``verify`` found damage, ``diff``
found differences, ``ls`` or ``prune`` meet a broken checkpoint); 2 could not be done (a bad argument,
a missing path, a checkpoint that does not read, a storage failure), with one line on
stderr and no traceback; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .cli_common import S3_DEFAULTS, options_for, parse_option
from .cli_convert import cmd_convert
from .cli_diff import cmd_diff
from .cli_export import cmd_export
from .cli_list import cmd_inspect, cmd_ls, cmd_verify
from .cli_prune import cmd_prune
from .demo import run_demo
from .errors import CheckpointError, StorageError
from .version import LIBRARY

__all__ = ["main", "build_parser"]

_DESCRIPTION = """\
List, inspect, verify, compare, export, convert and prune checkpoints written by
checkpointer-engine (safetensors + msgpack manifest), locally or on any fsspec URL.
"""
_EPILOG = """\
exit codes: 0 done; 1 done and the answer is no (verify found damage, diff found
differences, ls or prune meet a broken checkpoint); 2 could not be done; 130 interrupted.
URLs are local paths or any fsspec URL (s3://bucket/run, memory://x, ...).
"""


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo's two runs, then ``ls`` and ``verify`` of what they left."""
    run_demo(args.directory, epochs=args.epochs, interrupt_at=args.interrupt_at,
             storage_options=options_for(args.storage_option, args.directory))
    listing = argparse.Namespace(url=args.directory, monitor=None, mode=None, json=False,
                                 storage_option=args.storage_option, progress=False)
    print(f"== checkpointer ls {args.directory}")
    cmd_ls(listing)
    print(f"== checkpointer verify {args.directory}")
    return cmd_verify(listing)


def _common(json: bool = False, progress: bool = False) -> argparse.ArgumentParser:
    """The options every command takes (``--storage-option``), and ``--json`` /
    ``--no-progress`` where they apply."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-o", "--storage-option", metavar="KEY=VALUE", action="append", default=[],
                   type=parse_option, help=(
                       "an fsspec storage option for remote URLs (repeatable); dots nest, values "
                       "are JSON when they parse: -o client_kwargs.endpoint_url=http://127.0.0.1:9000"))
    if json:
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    if progress:
        p.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar (there is none anyway when stderr is not a terminal)")
    return p


_Add = Callable[..., argparse.ArgumentParser]
_MONITOR_HELP = "metric that ranks 'best' (default: the manager's, from the index)"


def _reading(add: _Add) -> None:
    """The commands that only read: demo aside, ``ls``, ``inspect``, ``verify``, ``diff``."""
    d = add("demo", "train a small numpy model, interrupt it, resume, list the checkpoints")
    d.add_argument("directory", nargs="?", default="demo-checkpoints")
    d.add_argument("--epochs", type=int, default=12)
    d.add_argument("--interrupt-at", type=int, default=5)
    d.set_defaults(fn=cmd_demo)
    ls = add("ls", "table of the checkpoints in a directory: name, step, epoch, metrics, size, "
             "time, latest/best/broken", json=True)
    ls.add_argument("url")
    ls.add_argument("--monitor", help=_MONITOR_HELP)
    ls.add_argument("--mode", choices=["min", "max", "auto"])
    ls.set_defaults(fn=cmd_ls)
    ins = add("inspect", "arrays (key, dtype, shape, size), values and metadata of one checkpoint",
              json=True)
    ins.add_argument("checkpoint")
    ins.set_defaults(fn=cmd_inspect)
    ver = add("verify", "check every checksum of one checkpoint or of a whole directory",
              json=True, progress=True)
    ver.add_argument("url")
    ver.set_defaults(fn=cmd_verify)
    dif = add("diff", "arrays added, removed or changed between two checkpoints, and changed "
              "values; exit 0 when equal, 1 when different", json=True, progress=True)
    dif.add_argument("a")
    dif.add_argument("b")
    dif.add_argument("--atol", type=float, default=0.0,
                     help="elements closer than this count as equal (default 0: exact)")
    dif.set_defaults(fn=cmd_diff)


def _writing(add: _Add) -> None:
    """The commands that write or delete: ``export``, ``convert``, ``prune``."""
    exp = add("export", "write a checkpoint's arrays as one standard .safetensors file",
              progress=True)
    exp.add_argument("checkpoint")
    exp.add_argument("out", help="the .safetensors file to write (replaced if it exists)")
    exp.add_argument("--prefix", help="only the arrays under this key, with the prefix stripped "
                     "(e.g. --prefix model)")
    exp.set_defaults(fn=cmd_export)
    con = add("convert", "bring a .safetensors, .npz or PyTorch/Lightning .pt/.ckpt file in as a "
              "checkpoint (no pickle: torch files only through torch's weights_only loader)")
    con.add_argument("src")
    con.add_argument("dst", help="the checkpoint to write, e.g. ckpts/imported")
    con.add_argument("--overwrite", action="store_true", help="replace DST if it is a checkpoint")
    con.add_argument("--from", dest="src_format", choices=["safetensors", "npz", "torch"],
                     help="the format of SRC (default: from its name)")
    con.set_defaults(fn=cmd_convert)
    pr = add("prune", "delete checkpoints a retention policy does not keep (only the engine's "
             "own); prints what is kept and why", json=True, progress=True)
    pr.add_argument("url")
    pr.add_argument("--keep-last", type=int, metavar="N")
    pr.add_argument("--keep-best", type=int, metavar="K")
    pr.add_argument("--monitor", help=_MONITOR_HELP)
    pr.add_argument("--mode", choices=["min", "max", "auto"])
    pr.add_argument("--keep-every-n-steps", type=int, metavar="N")
    pr.add_argument("--keep-every-n-epochs", type=int, metavar="N")
    pr.add_argument("--dry-run", action="store_true", help="show what would go; delete nothing")
    pr.set_defaults(fn=cmd_prune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``checkpointer`` command."""
    p = argparse.ArgumentParser(prog="checkpointer", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=_DESCRIPTION)
    p.add_argument("--version", action="version", version=LIBRARY)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, **kw: bool) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              parents=[_common(**kw)])

    _reading(add)
    _writing(add)
    return p


def _error(exc: BaseException, args: argparse.Namespace) -> None:
    print(f"checkpointer: error: {exc}", file=sys.stderr)
    if "NoCredentialsError" in str(exc):
        print("checkpointer: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
              "pass -o key=... -o secret=...; -o anon=true for a public bucket", file=sys.stderr)
    pairs = args.storage_option
    if isinstance(exc, StorageError) and "Could not connect" in str(exc) and not any(
            path[:2] == ("config_kwargs", "retries") for path, _ in pairs):
        attempts = S3_DEFAULTS[("config_kwargs", "retries")]["total_max_attempts"]
        print(f"checkpointer: gave up after {attempts} attempts; for a slow or flaky network pass "
              "-o config_kwargs.retries.total_max_attempts=10", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``checkpointer`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("checkpointer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `checkpointer ls ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointError, OSError) as exc:  # a user's mistake or the store's failure
        _error(exc, args)
        return 2
    except MemoryError:  # what the library could not turn into an InsufficientMemoryError
        print("checkpointer: error: not enough memory for this command", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
