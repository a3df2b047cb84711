"""The unknown-flag check shared by the parsers (:func:`abmll.args.check_flags`) and the
console entry's early check against the stored ``--help`` texts (:mod:`abmll.__main__`, which
answers before torch is imported). Standard library only."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


def unknown_flag(argv: Iterable[str], known: Iterable[str], prog: str) -> str | None:
    """The error for the first ``--flag`` of ``argv`` (``--flag=value`` too) that is not in
    ``known``, naming up to three nearest known flags (underscore spellings); None when all
    are known. E.g. ``"abmll evaluate: unknown flag --inner_lrr; did you mean --inner_lr?"``."""
    known = set(known)
    for arg in argv:
        flag = arg.split("=")[0]
        if flag.startswith("--") and flag not in known:
            names = sorted(k for k in known if k.startswith("--") and "-" not in k[2:])
            near = difflib.get_close_matches(flag, names, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(near)}?" if near else "; see --help"
            return f"{prog}: unknown flag {flag}{hint}"
    return None


def flags_in_help(text: str) -> set[str]:
    """Every option string of an argparse ``--help`` text (the options listing: lines that
    start with two spaces and a dash, aliases included), e.g. {"-h", "--help", "--rank"}."""
    known = set()
    for line in text.splitlines():
        if line.startswith("  -"):
            head = re.split(r"\s{2,}", line.strip())[0]
            known.update(part.split()[0] for part in head.split(", "))
    return known
