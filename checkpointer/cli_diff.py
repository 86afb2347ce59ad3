"""``checkpointer diff A B``: arrays added, removed and changed (dtype, shape, max absolute
and relative difference), and values changed (step, epoch, metrics, metadata, the plain
leaves of the state). Exit 0 when equal, 1 when different.

Arrays are read one pair at a time through :class:`~checkpointer.reader.CheckpointReader`
(each checksum checked) and compared in chunks, so memory holds two arrays, never two
checkpoints. Equal means: same dtype and shape, every element within ``--atol`` (NaN equals
NaN); ``time``, ``seq`` and ``library`` are not compared.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cli_arrays import Array, arrays, dtype_name, read_array, values, walk
from .cli_common import Progress, counting, emit_json, table
from .cli_list import open_checkpoint
from .errors import ConfigurationError
from .manifest import Manifest
from .reader import CheckpointReader
from .tree import unflatten

__all__ = ["cmd_diff", "compare", "Change"]

_CHUNK = 1 << 20  # elements compared at a time: a few float64 temporaries of 8 MiB


@dataclass(frozen=True)
class Change:
    """How one array differs: dtype/shape changes, and element differences where the shapes
    match (``differing`` elements beyond the tolerance, their largest differences)."""

    name: str
    dtype: tuple[str, str]
    shape: tuple[tuple[int, ...], tuple[int, ...]]
    differing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0

    @property
    def changed(self) -> bool:
        return self.dtype[0] != self.dtype[1] or self.shape[0] != self.shape[1] or self.differing > 0


def _numeric(a: np.ndarray) -> np.ndarray:
    return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)


def compare(x: np.ndarray, y: np.ndarray, atol: float = 0.0) -> tuple[int, float, float]:
    """``(elements differing by more than atol, max |x-y|, max |x-y|/|x|)`` of two arrays of
    one shape; NaN equals NaN, a NaN against a number is a difference (and makes the
    maxima NaN); the relative difference is infinite where ``x`` is 0 and ``y`` is not."""
    xs, ys = x.reshape(-1), y.reshape(-1)
    exact = x.dtype == y.dtype and x.dtype.kind in "biu"  # ints beyond 2**53 compare exactly
    differing, max_abs, max_rel = 0, 0.0, 0.0
    for lo in range(0, xs.size, _CHUNK):
        xr, yr = xs[lo:lo + _CHUNK], ys[lo:lo + _CHUNK]
        a, b = _numeric(xr), _numeric(yr)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            d = np.abs(a - b)
            same = (xr == yr) if exact else ((a == b) | (np.isnan(a) & np.isnan(b)))
            d[same] = 0.0
            nan = np.isnan(d)
            beyond = (d > atol) | (~same if exact and atol == 0 else False)  # 2**60+1 is not 2**60
            differing += int(np.count_nonzero(nan | beyond))
            if nan.any():
                max_abs = max_rel = math.nan
            elif not math.isnan(max_abs) and d.size:
                rel = np.where(a != 0, d / np.abs(np.where(a != 0, a, 1)), np.where(d > 0, np.inf, 0.0))
                max_abs, max_rel = max(max_abs, float(d.max())), max(max_rel, float(np.max(rel)))
    return differing, max_abs, max_rel


@dataclass
class _Report:
    added: list[Array] = field(default_factory=list)
    removed: list[Array] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    compared: int = 0
    fields: int = 0
    values: dict[str, list[tuple[str, Any, Any]]] = field(
        default_factory=lambda: {"added": [], "removed": [], "changed": []})

    @property
    def equal(self) -> bool:
        return not (self.added or self.removed or self.changed or any(self.values.values()))


def _fields(m: Manifest) -> dict[str, Any]:
    """Everything but the arrays that makes two checkpoints differ, by path."""
    out: dict[str, Any] = {"step": m.get("step"), "epoch": m.get("epoch")}
    metrics = m.get("metrics")
    if isinstance(metrics, dict):
        out.update({f"metrics/{k}": v for k, v in metrics.items()})
    meta = m.get("metadata")
    if meta is not None:
        out.update({f"metadata/{p}".rstrip("/"): v for p, v in walk(unflatten(meta, {}))})
    out.update({f"state/{p}".rstrip("/"): v for p, v in values(m).items()})
    return out


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    return bool(a == b)


def _diff_values(report: _Report, ma: Manifest, mb: Manifest) -> None:
    fa, fb = _fields(ma), _fields(mb)
    report.fields = len(fa.keys() & fb.keys())
    report.values["removed"] = [(k, v, None) for k, v in fa.items() if k not in fb]
    report.values["added"] = [(k, None, v) for k, v in fb.items() if k not in fa]
    report.values["changed"] = [(k, fa[k], fb[k]) for k in fa if k in fb and not _same(fa[k], fb[k])]


def _diff_arrays(report: _Report, ra: CheckpointReader, rb: CheckpointReader, atol: float,
                 bar: Progress) -> None:
    xa = {a.name: a for a in arrays(ra.manifest, ra.url)}
    xb = {b.name: b for b in arrays(rb.manifest, rb.url)}
    report.removed = [a for k, a in xa.items() if k not in xb]
    report.added = [b for k, b in xb.items() if k not in xa]
    common = [(xa[k], xb[k]) for k in xa if k in xb]
    bar.start(sum(a.nbytes + b.nbytes for a, b in common if a.shape == b.shape))
    for a, b in common:
        report.compared += 1
        change = Change(a.name, (dtype_name(a.code), dtype_name(b.code)), (a.shape, b.shape))
        if a.shape == b.shape:
            change = Change(change.name, change.dtype, change.shape,
                            *compare(read_array(ra, a), read_array(rb, b), atol))
        if change.changed:
            report.changed.append(change)


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s)) or "scalar"


def _describe(c: Change) -> str:
    if c.shape[0] != c.shape[1]:
        head = f"shape {_shape(c.shape[0])} -> {_shape(c.shape[1])}"
        return head + (f", dtype {c.dtype[0]} -> {c.dtype[1]}" if c.dtype[0] != c.dtype[1] else "")
    head = (f"dtype {c.dtype[0]} -> {c.dtype[1]}, {_shape(c.shape[0])}" if c.dtype[0] != c.dtype[1]
            else f"{c.dtype[0]} {_shape(c.shape[0])}")
    if not c.differing:
        return f"{head}: values equal"
    return (f"{head}: {c.differing} of {math.prod(c.shape[0])} elements differ, "
            f"max abs {c.max_abs:.4g}, max rel {c.max_rel:.4g}")


def _print(report: _Report, url_a: str, url_b: str) -> None:
    print(f"--- {url_a}\n+++ {url_b}")
    rows = [["array", "removed", a.name, f"{dtype_name(a.code)} {_shape(a.shape)}"] for a in report.removed]
    rows += [["array", "added", b.name, f"{dtype_name(b.code)} {_shape(b.shape)}"] for b in report.added]
    rows += [["array", "changed", c.name, _describe(c)] for c in report.changed]
    for what in ("removed", "added", "changed"):
        for path, va, vb in report.values[what]:
            text = {"removed": f"{va!r:.80}", "added": f"{vb!r:.80}",
                    "changed": f"{va!r:.60} -> {vb!r:.60}"}[what]
            rows.append(["value", what, path, text])
    if rows:
        print(table(rows))
    v = report.values
    if report.equal:
        print(f"equal: {report.compared} arrays and {report.fields} values compared")
    else:
        print(f"different: {_n(len(report.changed), 'array')} changed, {len(report.added)} added, "
              f"{len(report.removed)} removed; {_n(len(v['changed']), 'value')} changed, "
              f"{len(v['added'])} added, {len(v['removed'])} removed")


def _json(report: _Report, url_a: str, url_b: str, atol: float) -> dict[str, Any]:
    def arr(a: Array) -> dict[str, Any]:
        return {"key": a.name, "dtype": dtype_name(a.code), "shape": list(a.shape)}

    return {"a": url_a, "b": url_b, "equal": report.equal, "atol": atol,
            "arrays": {"compared": report.compared, "added": [arr(b) for b in report.added],
                       "removed": [arr(a) for a in report.removed],
                       "changed": [{"key": c.name, "dtype": list(c.dtype),
                                    "shape": [list(c.shape[0]), list(c.shape[1])],
                                    "differing": c.differing if c.shape[0] == c.shape[1] else None,
                                    "max_abs": c.max_abs if c.shape[0] == c.shape[1] else None,
                                    "max_rel": c.max_rel if c.shape[0] == c.shape[1] else None}
                                   for c in report.changed]},
            "values": {what: [{"path": p, "a": va, "b": vb} for p, va, vb in rows]
                       for what, rows in report.values.items()}}


def cmd_diff(args: argparse.Namespace) -> int:
    if not args.atol >= 0:  # also NaN
        raise ConfigurationError(f"--atol must be a number >= 0, got {args.atol}")
    store_a, name_a = open_checkpoint(args, args.a)
    store_b, name_b = open_checkpoint(args, args.b)
    report = _Report()
    with Progress("diff", enabled=args.progress) as bar, \
            CheckpointReader(counting(store_a, bar), name_a) as ra, \
            CheckpointReader(counting(store_b, bar), name_b) as rb:
        _diff_values(report, ra.manifest, rb.manifest)
        _diff_arrays(report, ra, rb, args.atol, bar)
    url_a, url_b = store_a.url_of(name_a), store_b.url_of(name_b)
    if args.json:
        emit_json(_json(report, url_a, url_b, args.atol))
    else:
        _print(report, url_a, url_b)
    return 0 if report.equal else 1
