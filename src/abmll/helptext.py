"""The stored ``abmll <command> --help`` texts (``src/abmll/help/<command>.txt``), so that
``--help`` answers without importing torch (:mod:`abmll.__main__`). After changing a flag or
its help, ``make help`` rewrites them; a test checks they match the parsers."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from abmll.args import build_parser, config_file_defaults
from abmll.cli import COMMAND_TABLE
from abmll.config import DEMO_CONFIG

HELP_WIDTH = 100
"""Columns of the stored ``--help`` texts (``src/abmll/help/<command>.txt``)."""
HELP_DIR = Path(__file__).with_name("help")


def command_help(command: str) -> str:
    """``abmll <command> --help`` as the command's parser renders it, ``HELP_WIDTH`` columns wide.
    Stored in ``src/abmll/help/`` (:func:`write_help`) so that ``--help`` answers without
    importing torch (:mod:`abmll.__main__`); a test checks the stored texts are current."""
    spec = COMMAND_TABLE[command]
    parser, classes = build_parser(spec.groups, spec.args, command, f"runs/{command}", spec.unused())
    if command == "demo":  # its defaults are demo.yaml's
        parser.set_defaults(**config_file_defaults(DEMO_CONFIG, classes))
    # argparse wraps at $COLUMNS - 2 by default: fix the width instead, whatever the terminal
    parser.formatter_class = partial(parser.formatter_class, width=HELP_WIDTH - 2)
    return parser.format_help()


def write_help(folder: Path = HELP_DIR) -> None:
    """Write every command's :func:`command_help` to ``folder/<command>.txt`` (``make help``)."""
    folder.mkdir(exist_ok=True)
    for command in COMMAND_TABLE:
        (folder / f"{command}.txt").write_text(command_help(command), encoding="utf-8")
