"""Monitor: mode inference, min_delta, thresholds, strict improvement and NaN handling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from checkpointer.errors import ConfigurationError, MetricError
from checkpointer.monitor import Monitor, optional_monitor

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("mae", "min"),
        ("val_mae", "min"),
        ("mse", "min"),
        ("binary_crossentropy", "min"),
        ("val_binary_crossentropy", "min"),
        ("val/loss", "min"),
        ("train_loss", "min"),
        ("valLoss", "min"),
        ("error", "min"),
        ("perplexity", "min"),
        ("accuracy", "max"),
        ("val_accuracy", "max"),
        ("acc", "max"),
        ("val_acc", "max"),
        ("auc", "max"),
        ("val_auc", "max"),
        ("f1", "max"),
        ("precision", "max"),
        ("recall", "max"),
        ("iou", "max"),
        ("mean_io_u", "max"),
        ("val_mean_io_u", "max"),
        ("val/accuracy", "max"),
        ("top5", "max"),
        ("sparse_categorical_accuracy", "max"),
        ("MeanIoU", "max"),
        ("val_AUC", "max"),
        ("val_binary_accuracy", "max"),
        ("top_k_categorical_accuracy", "max"),
        ("val_categorical_crossentropy", "min"),
        ("sparse_categorical_crossentropy", "min"),
        ("mean_squared_error", "min"),
        ("root_mean_squared_error", "min"),
        ("mean_absolute_percentage_error", "min"),
        ("val/acc", "max"),
        ("train/loss", "min"),
    ],
)
def test_auto_mode(metric: str, mode: str) -> None:
    m = Monitor.create(metric)
    assert (m.mode, m.metric) == (mode, metric)


@pytest.mark.parametrize("metric", ["foo", "val_foo", "lr", "epoch", "val_", "loss_accuracy"])
def test_auto_mode_unknown_asks_for_mode(metric: str) -> None:
    with pytest.raises(ConfigurationError, match="mode"):
        Monitor.create(metric)
    assert Monitor.create(metric, mode="max").mode == "max"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metric": ""},
        {"metric": None},
        {"metric": "loss", "mode": "minimum"},
        {"metric": "loss", "min_delta": -0.1},
        {"metric": "loss", "min_delta": NAN},
        {"metric": "loss", "min_delta": INF},
        {"metric": "loss", "min_delta": True},
        {"metric": "loss", "min_delta": "0.1"},
        {"metric": "loss", "initial_value_threshold": "1"},
        {"metric": "loss", "nan_policy": "ignore"},
    ],
)
def test_invalid_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Monitor.create(**kwargs)


@pytest.mark.parametrize("kwargs, error", [
    ({"mode": "down"}, "mode must be"),                     # checked without a metric too
    ({"nan_policy": "ignore"}, "nan_policy must be"),
    ({"nan_policy": "ignore", "mode": "down"}, "nan_policy must be"),  # nan_policy first
    ({"min_delta": -1.0}, None),                            # ranking options: unused, unchecked
    ({}, None),
])
def test_optional_monitor_without_a_metric(kwargs: dict[str, Any], error: str | None) -> None:
    if error is None:
        assert optional_monitor(None, **kwargs) is None
    else:
        with pytest.raises(ConfigurationError, match=error):
            optional_monitor(None, **kwargs)


def test_optional_monitor_with_a_metric_is_create() -> None:
    assert optional_monitor("val_acc", nan_policy="skip") == Monitor.create("val_acc", nan_policy="skip")
    with pytest.raises(ConfigurationError, match="min_delta"):
        optional_monitor("val_acc", min_delta=-1.0)


# (mode, min_delta, threshold, value, best, improves)
IMPROVEMENT = [
    ("min", 0.0, None, 0.5, None, True),
    ("min", 0.0, None, 0.4, 0.5, True),
    ("min", 0.0, None, 0.5, 0.5, False),  # tie keeps the older
    ("min", 0.0, None, 0.6, 0.5, False),
    ("max", 0.0, None, 0.6, 0.5, True),
    ("max", 0.0, None, 0.5, 0.5, False),
    ("max", 0.0, None, 0.4, 0.5, False),
    ("min", 0.1, None, 0.45, 0.5, False),  # not by more than min_delta
    ("min", 0.1, None, 0.35, 0.5, True),
    ("max", 0.1, None, 0.55, 0.5, False),
    ("max", 0.1, None, 0.65, 0.5, True),
    ("min", 0.0, 0.3, 0.4, None, False),  # must beat the initial threshold
    ("min", 0.0, 0.3, 0.3, None, False),
    ("min", 0.0, 0.3, 0.2, None, True),
    ("max", 0.0, 0.9, 0.8, None, False),
    ("max", 0.0, 0.9, 0.95, None, True),
    ("min", 0.0, 0.3, 0.2, 0.1, False),  # both the best and the threshold
    ("min", 0.0, 0.3, 0.05, 0.1, True),
    ("min", 0.0, None, NAN, None, False),  # NaN never improves
    ("min", 0.0, None, NAN, 0.5, False),
    ("max", 0.0, None, NAN, None, False),
    ("min", 0.0, None, INF, None, False),
    ("min", 0.0, None, -INF, 0.5, False),
    ("min", 0.0, None, None, 0.5, False),
    ("min", 0.0, None, 0.4, NAN, True),  # a NaN best never blocks a later improvement
    ("max", 0.0, None, 0.4, NAN, True),
    ("min", 0.0, None, -5.0, None, True),
]


@pytest.mark.parametrize(
    ("mode", "min_delta", "threshold", "value", "best", "improves"), IMPROVEMENT
)
def test_is_improvement(
    mode: str,
    min_delta: float,
    threshold: float | None,
    value: float | None,
    best: float | None,
    improves: bool,
) -> None:
    m = Monitor.create("score", mode=mode, min_delta=min_delta, initial_value_threshold=threshold)
    assert m.is_improvement(value, best) is improves


@pytest.mark.parametrize(
    ("mode", "a", "b", "better"),
    [
        ("min", 0.1, 0.2, True),
        ("min", 0.2, 0.1, False),
        ("min", 0.2, 0.2, False),
        ("max", 0.2, 0.1, True),
        ("max", 0.1, 0.2, False),
        ("min", 0.1, NAN, True),
        ("min", NAN, 0.1, False),
        ("max", NAN, -INF, False),
        ("min", 0.1, None, True),
        ("min", None, 0.1, False),
        ("min", NAN, NAN, False),
    ],
)
def test_better_ranks_nan_worst(mode: str, a: Any, b: Any, better: bool) -> None:
    assert Monitor.create("x", mode=mode).better(a, b) is better


def test_nan_sequence_never_best_never_blocks() -> None:
    m = Monitor.create("val_loss")
    best = None
    for value, improves in [
        (NAN, False),
        (0.5, True),
        (NAN, False),
        (0.6, False),
        (0.4, True),
        (0.4, False),
        (INF, False),
        (0.3, True),
    ]:
        assert m.is_improvement(value, best) is improves, value
        if improves:
            best = value
    assert best == 0.3


@pytest.mark.parametrize(
    ("metrics", "value"),
    [
        (None, None),
        ({}, None),
        ({"other": 1.0}, None),
        ({"val_loss": None}, None),
        ({"val_loss": 0.5}, 0.5),
        ({"val_loss": 1}, 1.0),
        ({"val_loss": np.float32(0.25)}, 0.25),
        ({"val_loss": np.array(0.125)}, 0.125),
        ({"val_loss": np.int64(3)}, 3.0),
    ],
)
def test_extract(metrics: Any, value: float | None) -> None:
    got = Monitor.create("val_loss").extract(metrics)
    assert got == value and (got is None or type(got) is float)


def test_extract_nan_and_tensor() -> None:
    torch = pytest.importorskip("torch")
    m = Monitor.create("val_loss")
    assert math.isnan(m.extract({"val_loss": float("nan")}) or 0.0)
    assert m.extract({"val_loss": torch.tensor(0.5)}) == 0.5


@pytest.mark.parametrize("bad", ["0.5", [0.5], np.array([0.5, 0.6]), True, object()])
def test_extract_non_number(bad: Any) -> None:
    with pytest.raises(MetricError):
        Monitor.create("val_loss").extract({"val_loss": bad})
