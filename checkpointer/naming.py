"""Checkpoint names: templates with ``{epoch}``, ``{step}`` and metric fields."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = ["template_fields", "format_name", "default_name", "check_name"]

_BAD = re.compile(r"[/\\\x00-\x1f]")


def template_fields(template: str) -> list[str]:
    """Field names used by ``template``.

    Raises:
        ConfigurationError: the template is not a valid format string or names folders.
    """
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigurationError(f"filename template {template!r} is invalid: {exc}") from None
    literal = "".join(lit for lit, *_ in string.Formatter().parse(template))
    if "/" in literal or "\\" in literal:
        raise ConfigurationError(f"filename template {template!r} must not contain folders")
    if any(f == "" or f.isdigit() for f in fields):
        raise ConfigurationError(f"filename template {template!r}: use named fields like {{epoch}}")
    if any("." in f or "[" in f for f in fields):  # {step.__class__}: attribute or item access
        raise ConfigurationError(f"filename template {template!r}: fields are plain names with a "
                                 "format spec ({epoch:02d}), without attribute or index access")
    return fields


def format_name(template: str, *, epoch: int | None, step: int | None,
                metrics: Mapping[str, Any] | None) -> str:
    """Fill ``template``. Path separators in the result become ``_``.

    Raises:
        ConfigurationError: a field has no value at this save point.
    """
    values: dict[str, Any] = dict(metrics or {})
    values["epoch"], values["step"] = epoch, step
    try:
        name = string.Formatter().vformat(template, (), _Strict(values))
    except (KeyError, ValueError, TypeError) as exc:
        have = ", ".join(sorted(k for k, v in values.items() if v is not None))
        raise ConfigurationError(
            f"filename template {template!r} cannot be filled ({exc}); values here: {have}") from None
    return check_name(_BAD.sub("_", name))


class _Strict(dict[str, Any]):
    def __missing__(self, key: str) -> Any:
        raise KeyError(f"no value for {{{key}}}")

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if value is None:
            raise KeyError(f"no value for {{{key}}}")
        return value


def default_name(*, epoch: int | None, step: int | None, seq: int) -> str:
    """``step-000001200`` when a step is known, else ``epoch-000012``, else ``save-000007``."""
    if step is not None:
        return f"step-{step:09d}"
    if epoch is not None:
        return f"epoch-{epoch:06d}"
    return f"save-{seq:06d}"


def check_name(name: str) -> str:
    """Refuse names the engine reserves or that are not plain folder names."""
    if not name or name.startswith(".") or _BAD.search(name) or len(name) > 200:
        raise ConfigurationError(
            f"checkpoint name {name!r} is not allowed (empty, leading dot, separators or too long)")
    return name
