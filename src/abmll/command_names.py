"""The ``abmll`` commands and the flags each cannot run without: plain data, importable without
torch by the console entry (:mod:`abmll.__main__`) and by the parser (:mod:`abmll.cli`)."""

from __future__ import annotations

from itertools import takewhile

COMMANDS = ("meta-train", "evaluate", "demo", "adapt", "predict", "export", "data")

REQUIRED = {
    "adapt": ("--prior", "--support"),
    "predict": ("--adapter", "--input"),
    "export": ("--adapter",),
    "data": ("--task",),
    "evaluate": ("--prior",),
}
"""Flags a command cannot run without (``evaluate``: unless ``--methods`` names no ABMLL
method), checked before torch is imported; a ``--config`` file may set them, so with one the
command's own check answers instead."""


def missing_required(command: str, args: list[str]) -> str | None:
    """The message naming the :data:`REQUIRED` flags of ``command`` absent from ``args``, or None."""
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if "--config" in given:
        return None
    missing = [f for f in REQUIRED.get(command, ()) if f not in given]
    if command == "evaluate" and "--methods" in args:  # no ABMLL method: no prior needed
        names = list(takewhile(lambda a: not a.startswith("--"), args[args.index("--methods") + 1 :]))
        if names and not any(n.startswith("abmll") for n in names):
            missing = []
    if not missing:
        return None
    what = " and ".join(missing)
    return f"abmll {command}: {what} {'is' if len(missing) == 1 else 'are'} required (see abmll {command} --help)"
