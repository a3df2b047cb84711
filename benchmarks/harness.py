"""What every benchmark script shares: its entry (the CLI's parser on a dataclass of flags), the
command line recorded with a result, the results writer (JSON + Markdown side by side in
benchmarks/results/) and the result cache keyed by configuration hash. The tiny random model
of smoke runs is :mod:`abmll.testing`'s, shared with the test suite."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

from abmll.args import parse_dataclasses
from abmll.checkpoint import write_json

RESULTS = Path(__file__).parent / "results"
"""Where committed results live: ``<name>.json`` and ``<name>.md`` per benchmark run."""


def parse(
    argv: list[str] | None, *classes: type, script: str, description: str | None = None, defaults: dict | None = None
) -> tuple:
    """``argv`` (default ``sys.argv[1:]``) parsed into one instance of each dataclass in
    ``classes`` by :func:`abmll.args.parse_dataclasses`: ``--help`` lists each field with the
    help of its ``Attributes:`` docstring; an unknown flag names the nearest ones.
    ``script``: the file name shown in usage (``benchmarks/<script>``); ``defaults`` (flag
    name -> value) replace the dataclasses' (e.g. a preset)."""
    argv = sys.argv[1:] if argv is None else argv
    return parse_dataclasses(list(argv), list(classes), f"benchmarks/{script}", description, defaults)


def command_line(script: str, argv: list[str] | None = None, prefix: str = ".venv/bin/python") -> str:
    """The command that reproduces a run, as recorded in its results: ``prefix
    benchmarks/<script> <argv>`` (shell-quoted; ``argv`` defaults to ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join([prefix, f"benchmarks/{script}", shlex.join(argv)]).rstrip()


def write_results(name: str, result: dict, markdown: str, folder: Path = RESULTS) -> None:
    """Write ``folder/<name>.json`` (``result``, indented, written atomically) and
    ``folder/<name>.md`` (``markdown``, ending in one newline)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", result)
    (folder / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")


def config_hash(config: dict) -> str:
    """10 hex digits of the SHA-1 of ``config`` as sorted JSON (non-JSON values by ``str``)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Cache:
    """(method, task, seed, config hash) -> {"metrics", "probs", "labels", ...}, in one JSON
    file rewritten atomically after each result. The hash is of the config the method's
    result depends on (e.g. ``quality.method_config``), so a changed setting recomputes only
    the methods it affects, and results of several settings (e.g. a sweep) live side by side.

    Raises:
        ValueError: ``path`` exists but is not a cache file (not JSON, or without "results").
    """

    def __init__(self, path: Path, configs: dict[str, dict], fresh: bool = False) -> None:
        self.path = path
        self.hashes = {m: config_hash(c) for m, c in configs.items()}
        self.results: dict[str, dict] = {}
        if path.is_file() and not fresh:
            try:
                self.results = json.loads(path.read_text())["results"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: not a benchmark cache ({err}); move it away or pass --fresh") from None

    def key(self, method: str, task: str, seed: int) -> str:
        return f"{method}|{task}|{seed}|{self.hashes[method]}"

    def get(self, method: str, task: str, seed: int) -> dict | None:
        return self.results.get(self.key(method, task, seed))

    def put(self, method: str, task: str, seed: int, entry: dict) -> None:
        self.results[self.key(method, task, seed)] = entry
        write_json(self.path, {"results": self.results})
