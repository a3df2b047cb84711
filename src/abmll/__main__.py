"""The ``abmll`` console entry point: ``--version``, the command list, each command's
``--help`` (stored texts, see :mod:`abmll.helptext`) and a mistyped flag answer at once,
without importing torch; everything else goes to :func:`abmll.cli.main`."""

from __future__ import annotations

import sys
import time
from itertools import takewhile

import abmll

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


def main(argv: list[str] | None = None) -> int:
    """Run ``abmll`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    started = time.perf_counter()  # the wall time printed at the end counts the imports below
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"abmll {abmll.__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        from importlib.resources import files

        doc = files("abmll").joinpath("cli.py").read_text(encoding="utf-8").split('"""')[1]
        print(doc)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from importlib.resources import files

    from abmll.flags import flags_in_help, unknown_flag

    stored = files("abmll").joinpath("help", f"{argv[0]}.txt").read_text(encoding="utf-8")  # abmll.helptext
    if any(a in ("-h", "--help") for a in argv[1:]):  # answered without importing torch
        print(stored, end="")
        return 0
    message = unknown_flag(argv[1:], flags_in_help(stored), f"abmll {argv[0]}") or missing_required(argv[0], argv[1:])
    if message:  # found before torch is imported; the parser would say the same after
        raise SystemExit(message)
    try:
        from abmll.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while torch and the models' code import
        print(f"abmll {argv[0]}: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return cli_main(argv, started)


if __name__ == "__main__":
    sys.exit(main())
