"""Schedule: every N epochs / steps / seconds, alone and combined, and validation."""

from __future__ import annotations

from typing import Any

import pytest

from checkpointer.errors import ConfigurationError
from checkpointer.schedule import Schedule

# (schedule kwargs, epoch, since, now, fires)
EPOCHS = [
    ({}, 1, None, 0.0, True),
    ({}, 7, None, 0.0, True),
    ({"every_n_epochs": 2}, 1, None, 0.0, False),
    ({"every_n_epochs": 2}, 2, None, 0.0, True),
    ({"every_n_epochs": 3}, 0, None, 0.0, True),
    ({"every_n_epochs": 3}, 9, None, 0.0, True),
    ({"every_n_epochs": None}, 5, None, 0.0, False),
    ({"every_n_epochs": None, "every_seconds": 10}, 5, 0.0, 9.9, False),
    ({"every_n_epochs": None, "every_seconds": 10}, 5, 0.0, 10.0, True),
    ({"every_n_epochs": 4, "every_seconds": 10}, 3, 0.0, 11.0, True),  # timer alone fires
    ({"every_n_epochs": 4, "every_seconds": 10}, 4, 0.0, 1.0, True),  # count alone fires
    ({"every_n_epochs": 4, "every_seconds": 10}, 3, 0.0, 1.0, False),
    ({"every_n_epochs": 4, "every_seconds": 10}, 3, None, 100.0, False),  # no reference time
    ({"every_n_epochs": None, "every_n_steps": 1}, 1, None, 0.0, False),  # steps do not fire epochs
]


@pytest.mark.parametrize(("kwargs", "epoch", "since", "now", "fires"), EPOCHS)
def test_at_epoch(
    kwargs: dict[str, Any], epoch: int, since: float | None, now: float, fires: bool
) -> None:
    reason = Schedule(**kwargs).at_epoch(epoch, since, now)
    assert (reason is not None) is fires
    if fires:
        assert isinstance(reason, str) and reason


STEPS = [
    ({}, 1, None, 0.0, False),  # default: epochs only
    ({"every_n_steps": 100}, 100, None, 0.0, True),
    ({"every_n_steps": 100}, 150, None, 0.0, False),
    ({"every_n_steps": 100}, 0, None, 0.0, True),
    ({"every_n_steps": 1}, 13, None, 0.0, True),
    ({"every_n_steps": 100, "every_seconds": 0.5}, 150, 1.0, 1.6, True),
    ({"every_n_steps": 100, "every_seconds": 0.5}, 150, 1.0, 1.4, False),
    ({"every_n_epochs": 1, "every_seconds": 60}, 3, 0.0, 61.0, True),
    ({"every_n_epochs": 1, "every_n_steps": 10, "every_seconds": 60}, 20, 0.0, 1.0, True),
]


@pytest.mark.parametrize(("kwargs", "step", "since", "now", "fires"), STEPS)
def test_at_step(
    kwargs: dict[str, Any], step: int, since: float | None, now: float, fires: bool
) -> None:
    assert (Schedule(**kwargs).at_step(step, since, now) is not None) is fires


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_epochs": 0},
        {"every_n_epochs": -1},
        {"every_n_epochs": 1.5},
        {"every_n_epochs": True},
        {"every_n_epochs": "2"},
        {"every_n_steps": 0},
        {"every_n_steps": False},
        {"every_seconds": 0},
        {"every_seconds": -1.0},
        {"every_seconds": float("nan")},
        {"every_seconds": True},
        {"every_seconds": "60"},
    ],
)
def test_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Schedule(**kwargs)


def test_all_disabled_never_fires() -> None:
    s = Schedule(every_n_epochs=None, every_n_steps=None, every_seconds=None)
    assert all(
        s.at_epoch(e, 0.0, 1e9) is None and s.at_step(e, 0.0, 1e9) is None for e in range(20)
    )
