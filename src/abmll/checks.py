"""Value checks for the config dataclasses, run in their ``__post_init__`` so an invalid
setting is refused when the config is built (from the CLI, a YAML file, a saved config or
Python), before any model is loaded. Each error names the field as its command-line flag.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def at_least(config, names: Iterable[str], low: float) -> None:
    """Raises ValueError unless every field in ``names`` of ``config`` is a number >= ``low``
    (finite, not NaN). Integers stay integers: a float field accepts an int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < low:
            raise ValueError(f"--{name} must be a finite number >= {low:g}, got {value!r}")


def above(config, names: Iterable[str], low: float) -> None:
    """Raises ValueError unless every field in ``names`` is a finite number > ``low``."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= low:
            raise ValueError(f"--{name} must be a finite number > {low:g}, got {value!r}")


def one_of(config, name: str, choices: Iterable[str]) -> None:
    """Raises ValueError unless field ``name`` is one of ``choices``."""
    choices = tuple(choices)
    if getattr(config, name) not in choices:
        raise ValueError(f"--{name} must be one of {', '.join(choices)}; got {getattr(config, name)!r}")


def non_empty(config, names: Iterable[str]) -> None:
    """Raises ValueError if a list field in ``names`` is empty or has repeated values."""
    for name in names:
        value = list(getattr(config, name))
        if not value:
            raise ValueError(f"--{name} needs at least one value")
        if len(set(value)) != len(value):
            raise ValueError(f"--{name} has repeated values: {value}")
