"""Each config field's role, declared once beside the field (in its dataclass metadata).

A field's role says which stage of the method uses it, and so which commands offer it as a
flag and which keys it enters. Three more marks say how it is saved and compared:

- ``added``: the field came after results and priors were first saved; at its default it is
  left out of every key and record (so their keys hold), set it is written.
- ``resumable``: may differ between a saved meta-training run and its resumption.
- ``inherited``: taken from a saved config as a default (False: where or on what a run was
  trained, not how to use it, e.g. its data folder and meta-training tasks).

The run configuration and the command table derive everything from these marks
(:func:`names`, :func:`is_added`, ...); no other module lists fields by role.
"""

from __future__ import annotations

import copy
import types
from dataclasses import MISSING, Field, field, fields

RUN = "run"
"""A setting of the run: every command with its group offers it; part of every key of what it affects."""
MACHINE = "machine"
"""Where and how fast the run goes (device, cache sizes): in no key, never taken from a saved
config, free to change on resume."""
OUTER = "outer"
"""Meta-training only (the outer loop, the hyperprior, the meta-train tasks): not offered by
adapt, evaluate and predict; not part of an adaptation's key."""
ADAPTATION = "adaptation"
"""Test-time adaptation only (its steps, learning rate, optimiser): not offered by predict."""
PREDICTION = "prediction"
"""Prediction only (weight samples averaged): not offered by adapt."""
EVALUATION = "evaluation"
"""Held-out evaluation only (test examples, compared priors, OOD tasks): evaluate and demo."""
BASELINE = "baseline"
"""The calibration baselines only (``abmll evaluate --methods``, the benchmarks)."""

ROLES = (RUN, MACHINE, OUTER, ADAPTATION, PREDICTION, EVALUATION, BASELINE)
MARKS = ("role", "added", "resumable", "inherited")
"""The metadata keys of :func:`setting` (argparse must not see them)."""


def setting(
    default=MISSING, *, factory=MISSING, role: str = RUN, added: bool = False, resumable: bool = False, inherited: bool = True
) -> Field:
    """A dataclass field with its role and marks (see the module docstring); the help text
    stays in the class's ``Attributes:`` docstring.

    Raises:
        ValueError: an unknown role.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    marks = {"role": role, "added": added, "resumable": resumable, "inherited": inherited}
    return field(default=default, default_factory=factory, metadata=marks)


def role(f: Field) -> str:
    """The role of dataclass field ``f`` (RUN when not declared)."""
    return f.metadata.get("role", RUN)


def is_added(f: Field) -> bool:
    """Added after results were saved: left out of keys while at its default."""
    return bool(f.metadata.get("added", False))


def is_resumable(f: Field) -> bool:
    """May change on resume: a resumable or machine field."""
    return bool(f.metadata.get("resumable", False)) or role(f) == MACHINE


def is_inherited(f: Field) -> bool:
    """Taken from a saved config as a default: not a machine field, not marked otherwise."""
    return bool(f.metadata.get("inherited", True)) and role(f) != MACHINE


def names(cls, *roles: str) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` with one of ``roles``, in order."""
    return tuple(f.name for f in fields(cls) if role(f) in roles)


def default(f: Field):
    """The field's default value (its factory called)."""
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def added_at_default(config) -> set[str]:
    """The ``added`` fields of dataclass instance ``config`` that hold their default."""
    return {f.name for f in fields(config) if is_added(f) and getattr(config, f.name) == default(f)}


def without_marks(f: Field) -> Field:
    """A copy of ``f`` whose metadata lacks the role marks (what argparse is given)."""
    out = copy.copy(f)
    out.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k not in MARKS})
    return out
