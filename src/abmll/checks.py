"""Value checks for the config dataclasses, run in their ``__post_init__`` so an invalid
setting is refused when the config is built (from the CLI, a YAML file, a saved config or
Python), before any model is loaded. Each error names the field as its command-line flag.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

FLOAT32_MAX = 3.4028234663852886e38
"""Larger numbers overflow the float32 tensors they end up in."""

SEED_LIMIT = 2**32
"""Seeds are below this (numpy's RandomState takes no larger)."""


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _integer_field(config, name: str) -> bool:
    """True when dataclass field ``name`` of ``config`` is declared ``int`` (or ``int | None``)."""
    kind = next((f.type for f in dataclasses.fields(config) if f.name == name), None)
    return kind in (int, "int", "int | None")


def at_least(config, names: Iterable[str], low: float) -> None:
    """Raises ValueError unless every field in ``names`` of ``config`` is a number >= ``low``
    (finite in float32, not NaN); a field declared ``int`` must hold an integer (a value from
    a YAML file or Python is not converted by the parser). A float field accepts an int."""
    for name in names:
        value = getattr(config, name)
        if _integer_field(config, name):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low:g}, got {value!r}")
        elif not _number(value) or value < low:
            raise ValueError(f"--{name} must be a finite number >= {low:g}, got {value!r}")


def seeds(config, names: Iterable[str]) -> None:
    """Raises ValueError unless every field in ``names`` (an int or a list of ints) holds
    integers in [0, 2^32)."""
    for name in names:
        value = getattr(config, name)
        for seed in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"--{name} must be an integer in [0, 2^32), got {seed!r}")


def above(config, names: Iterable[str], low: float) -> None:
    """Raises ValueError unless every field in ``names`` is a finite number > ``low``."""
    for name in names:
        value = getattr(config, name)
        if not _number(value) or value <= low:
            raise ValueError(f"--{name} must be a finite number > {low:g}, got {value!r}")


def one_of(config, name: str, choices: Iterable[str]) -> None:
    """Raises ValueError unless field ``name`` is one of ``choices``."""
    choices = tuple(choices)
    if getattr(config, name) not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {getattr(config, name)!r}")


def non_empty(config, names: Iterable[str]) -> None:
    """Raises ValueError if a list field in ``names`` is empty or has repeated values."""
    for name in names:
        if not getattr(config, name):
            raise ValueError(f"--{name} needs at least one value")
    distinct(config, names)


def distinct(config, names: Iterable[str]) -> None:
    """Raises ValueError if a list field in ``names`` has repeated values."""
    for name in names:
        value = list(getattr(config, name))
        if len(set(value)) != len(value):
            raise ValueError(f"--{name} has repeated values: {value}")
