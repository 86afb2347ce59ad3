"""The docs tests' summary: how many Python blocks ran, how many are excerpts, how long."""

from __future__ import annotations

from typing import Any

from _blocks import SUMMARY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the docs blocks' counts and times (shown with ``-q`` too)."""
    if SUMMARY:
        terminalreporter.section("docs blocks")
        for line in SUMMARY:
            terminalreporter.write_line(line)
