"""Improvement logic: is a metric value better than the best so far?

Plain Python over plain floats: no framework, no I/O. The best is passed in (derived from
the checkpoints on storage), so a resumed run needs no saved monitor state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigurationError, MetricError
from .hints import close_names

__all__ = ["Monitor", "Score", "infer_mode", "check_options", "optional_monitor",
           "direction_error", "scalar_metrics"]

_MIN_WORDS = {"loss", "error", "err", "mse", "mae", "rmse", "mape", "msle", "nll", "cost",
              "perplexity", "ppl", "crossentropy", "entropy", "hinge", "kld", "kl",
              "divergence", "distance", "wer", "cer", "fid"}
_MAX_WORDS = {"acc", "accuracy", "auc", "f1", "fbeta", "fscore", "precision", "recall", "iou",
              "miou", "map", "dice", "bleu", "rouge", "r2", "top1", "top5", "sensitivity",
              "specificity", "score", "reward", "return"}
NanPolicy = Literal["worst", "skip", "raise"]
# Keras's and Lightning's usual metric names, beyond the words above: what a typo is
# compared with (see direction_error)
_COMMON = ("categorical_accuracy", "sparse_categorical_accuracy", "binary_accuracy",
           "top_k_categorical_accuracy", "mean_squared_error", "mean_absolute_error",
           "mean_io_u", "f1_score", "log_loss", "cross_entropy")
_PREFIXES = ("", "val_", "train_", "test_", "valid_", "val/", "train/", "test/")


def direction_error(metric: str, seen: Iterable[str] = ()) -> ConfigurationError:
    """The error for ``mode="auto"`` and a name whose direction is unknown: the usual
    metric names close to it (and those of ``seen``, the metrics actually passed, first)
    as a "did you mean", else what to pass."""
    seen = list(seen)
    usual = [p + w for p in _PREFIXES for w in (*_MIN_WORDS, *_MAX_WORDS, *_COMMON)]
    found = close_names(metric, seen, n=2) or close_names(metric, usual, n=1)
    what = f"monitor {metric!r} is not a metric name whose direction is known"
    if found:
        return ConfigurationError(f"{what}: did you mean {' or '.join(map(repr, found))}? "
                                  "Else pass mode='min' or mode='max'")
    return ConfigurationError(f"{what} (mode='auto' reads loss- or accuracy-like words in the "
                              "name): pass mode='min' or mode='max'")


def infer_mode(metric: str) -> Literal["min", "max"] | None:
    """``"min"`` for loss/error-like names, ``"max"`` for accuracy-like ones, else ``None``.

    A ``val_`` (or ``val/``, ``train_``, ``test_``) prefix is ignored; the name is split on
    ``_ / . -`` and camel case, and a part naming a loss or a score decides.
    """
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", metric).lower()
    name = re.sub(r"^(val|valid|validation|train|test)[_/.\-]", "", name)
    words = set(re.split(r"[_/.\-\s]+", name)) | {name}
    if "io_u" in name:
        words.add("iou")
    lo, hi = bool(words & _MIN_WORDS), bool(words & _MAX_WORDS)
    if lo != hi:
        return "min" if lo else "max"
    return None


@dataclass(frozen=True)
class Score:
    """One save point's monitored value, judged once under the NaN policy.

    ``value`` is what ranks the checkpoint (``None``: the metric is missing, so it is not
    ranked; a NaN/inf under ``nan_policy="worst"`` stays and ranks worst); ``skip`` says why
    the save point must not save at all (``nan_policy="skip"``), else ``None``.
    """

    value: float | None
    skip: str | None = None

    @property
    def missing(self) -> bool:
        """The monitored metric was not given."""
        return self.value is None and self.skip is None

    @property
    def finite(self) -> bool:
        """A value that can be the best."""
        return self.value is not None and math.isfinite(self.value)


@dataclass(frozen=True)
class Monitor:
    """How to compare values of one metric.

    Build it with :meth:`create`, which validates and resolves ``mode="auto"``.

    Example::

        m = Monitor.create("val_loss")          # mode resolved to "min"
        m.is_improvement(0.4, best=0.5)         # True
    """

    metric: str
    mode: Literal["min", "max"]
    min_delta: float = 0.0
    initial_value_threshold: float | None = None
    nan_policy: NanPolicy = "worst"

    @classmethod
    def create(cls, metric: str, mode: str = "auto", min_delta: float = 0.0,
               initial_value_threshold: float | None = None, nan_policy: str = "worst") -> Monitor:
        """Validate options and resolve ``mode="auto"``.

        Raises:
            ConfigurationError: an empty metric, an unknown mode or nan_policy, a negative or
                non-finite ``min_delta``, or ``auto`` that cannot tell from the name.
        """
        if not isinstance(metric, str) or not metric:
            raise ConfigurationError(f"monitor must be a non-empty metric name, got {metric!r}")
        if mode not in ("min", "max", "auto"):
            raise ConfigurationError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
        if mode == "auto":
            inferred = infer_mode(metric)
            if inferred is None:
                raise direction_error(metric)
            mode = inferred
        check_options(min_delta, initial_value_threshold, nan_policy)
        threshold = None if initial_value_threshold is None else float(initial_value_threshold)
        return cls(metric, mode, float(min_delta), threshold, nan_policy)  # type: ignore[arg-type]

    def extract(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The monitored value from ``metrics`` as a float, ``None`` when it is missing.

        Raises:
            MetricError: the value is not a number.
        """
        if not metrics or self.metric not in metrics or metrics[self.metric] is None:
            return None
        return to_float(self.metric, metrics[self.metric])

    def finite_value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The finite monitored value in ``metrics``, else ``None`` (also for a value that is
        not a number: never ranked)."""
        try:
            value = self.extract(metrics)
        except MetricError:
            return None
        return value if value is not None and math.isfinite(value) else None

    def score(self, metrics: Mapping[str, Any] | None) -> Score:
        """The monitored value of ``metrics`` under this monitor's ``nan_policy``: the one
        place where a NaN/inf is judged.

        Raises:
            MetricError: the value is not a number, or it is NaN/inf under ``"raise"``.

        Example::

            Monitor.create("val_loss", nan_policy="skip").score({"val_loss": float("nan")}).skip
            # "'val_loss' is nan (nan_policy='skip')"
        """
        value = self.extract(metrics)
        if value is None or math.isfinite(value):
            return Score(value)
        if self.nan_policy == "raise":
            raise MetricError(f"monitored metric {self.metric!r} is {value} (nan_policy='raise')")
        if self.nan_policy == "skip":
            return Score(value, f"{self.metric!r} is {value} (nan_policy='skip')")
        return Score(value)

    def is_improvement(self, value: float | None, best: float | None) -> bool:
        """Whether ``value`` strictly beats ``best`` and the initial threshold by ``min_delta``.

        A missing or non-finite value never improves; with no best and no threshold any
        finite value does. Ties keep the older checkpoint.
        """
        if value is None or not math.isfinite(value):
            return False
        for ref in (best, self.initial_value_threshold):
            if ref is None or not math.isfinite(ref):
                continue
            if self.mode == "min" and not value < ref - self.min_delta:
                return False
            if self.mode == "max" and not value > ref + self.min_delta:
                return False
        return True

    def better(self, a: float | None, b: float | None) -> bool:
        """Ranking: ``a`` strictly better than ``b`` (no min_delta; NaN/None rank worst)."""
        ka, kb = self.sort_key(a), self.sort_key(b)
        return ka < kb

    def sort_key(self, value: float | None) -> tuple[int, float]:
        """Ascending sort key: the best value first, missing/non-finite last."""
        if value is None or not math.isfinite(value):
            return (1, 0.0)
        return (0, value if self.mode == "min" else -value)


def check_options(min_delta: Any = 0.0, initial_value_threshold: Any = None,
                  nan_policy: Any = "worst") -> None:
    """Validate a monitor's options that do not depend on the metric or its mode (a
    callback that resolves its mode later checks these when it is built).

    Raises:
        ConfigurationError: a negative or non-finite ``min_delta``, a non-number
            ``initial_value_threshold``, or an unknown ``nan_policy``; the message has the value.
    """
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) \
            or not math.isfinite(min_delta) or min_delta < 0:
        raise ConfigurationError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
    if initial_value_threshold is not None and not _is_number(initial_value_threshold):
        raise ConfigurationError(
            f"initial_value_threshold must be a number or None, got {initial_value_threshold!r}")
    if nan_policy not in ("worst", "skip", "raise"):
        raise ConfigurationError(f"nan_policy must be 'worst', 'skip' or 'raise', got {nan_policy!r}")


def optional_monitor(metric: str | None, mode: str = "auto", min_delta: float = 0.0,
                     initial_value_threshold: float | None = None,
                     nan_policy: str = "worst") -> Monitor | None:
    """:meth:`Monitor.create`, or ``None`` when there is no ``metric``: ``nan_policy`` (first)
    and ``mode`` are validated even then, the options that only rank are not.

    Raises:
        ConfigurationError: as :meth:`Monitor.create`.
    """
    check_options(nan_policy=nan_policy)
    if metric is not None:
        return Monitor.create(metric, mode, min_delta, initial_value_threshold, nan_policy)
    if mode not in ("auto", "min", "max"):
        raise ConfigurationError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
    return None


def scalar_metrics(logs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``logs`` (a framework's logged values) that are scalar numbers, as
    floats; the others cannot be metrics and are left out."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        try:
            out[key] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            continue
    return out


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def to_float(name: str, value: Any) -> float:
    """A metric value (number, numpy scalar, 0-d array or tensor) as a Python float."""
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        try:
            value = value.item()
        except (ValueError, RuntimeError) as exc:
            raise MetricError(f"metric {name!r} is not a scalar: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MetricError(f"metric {name!r} is {type(value).__name__}, not a number")
    try:
        return float(value)
    except OverflowError:
        raise MetricError(f"metric {name!r} is an integer of {int(value).bit_length()} bits, too large "
                          "for a float") from None
