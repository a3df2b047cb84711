"""The ``abmll`` console entry point: ``--version``, the command list, each command's
``--help`` (stored texts, see :mod:`abmll.helptext`) and a mistyped flag answer at once,
without importing torch; everything else goes to :func:`abmll.cli.main`."""

from __future__ import annotations

import sys
import time

import abmll
from abmll.command_names import COMMANDS, missing_required


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
