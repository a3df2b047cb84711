"""Choose every method's test-time adaptation (optimiser, steps, learning rate) on dev data,
with the same search budget for each: the same grid of settings, the same dev tasks, seeds
and shots. Never touches a split's test tasks.

    .venv/bin/python benchmarks/tune_adaptation.py <quality.py flags, --val_tasks required> \
        [--grid sgd:5:0.3 adamw:10:0.003 ...]

The dev tasks are the meta-validation tasks (``--val_tasks``: train tasks of the split held
out of meta-training); each grid point runs the comparison (:func:`harness.run`) on their dev
files (support = the train file of ``--test_k`` shots), every adapting method with that
point's settings, from the same priors the test run uses (same ``--work_dir``: the priors
and results are reused, and a killed run resumes). The point with the lowest mean dev NLL
(over tasks, each task's mean over seeds) is chosen per method.

Writes ``<out_dir>/tune_adaptation-<split>.{json,md}`` and prints the ``--adaptation`` flags
of the choice, to pass to benchmarks/quality.py.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, replace

import bench_flags
import bench_report
import harness

from abmll.methods import get_spec

GRID = ["sgd:5:0.3", "sgd:10:0.1", "sgd:10:0.3", "sgd:10:1.0", "adamw:5:0.01", "adamw:10:0.003", "adamw:10:0.01", "adamw:10:0.03"]
"""OPTIMIZER:STEPS:LR points tried for every method: the shared recipe (SGD, 5 steps at 0.3),
twice the steps at three learning rates, and AdamW (no weight decay) at learning rates for a
few-step LoRA run. At most 10 steps: the test benchmark's compute budget on 2 CPU cores."""
SHOWN = ("nll", "accuracy", "macro_f1", "ece")


@dataclass
class TuneArgs:
    """Flags of this script beside benchmarks/quality.py's.

    Attributes:
        grid: OPTIMIZER:STEPS:LR settings tried for every adapting method (optimizer sgd or
            adamw).
    """

    grid: list[str] = field(default_factory=lambda: list(GRID))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench, cfg, own = bench_flags.parse_bench(argv, extra=(TuneArgs,), script="tune_adaptation.py")
    val = list(cfg.tasks.val_tasks)
    if not val:
        raise SystemExit("--val_tasks is required: the dev tasks (held out of meta-training) to tune on")
    adapting = [m for m in bench.methods if get_spec(m).adapt]
    dev_bench = replace(bench, eval_split="dev", plots=False)
    dev_cfg = replace(cfg, tasks=replace(cfg.tasks, test_tasks=val))
    split = cfg.tasks.split
    work = bench_flags.comparison_work_dir(bench, cfg)
    out_dir = bench_flags.comparison_out_dir(bench)
    command = bench_report.command_line("tune_adaptation.py", argv)
    rows = {}
    for i, point in enumerate(own.grid):  # --fresh discards the cache and priors once, not at every point
        point_bench = replace(dev_bench, adaptation=[f"{m}={point}" for m in adapting], fresh=bench.fresh and i == 0)
        bench_flags.adaptations(point_bench)  # refuses a malformed point before any run
        res, _ = harness.run(point_bench, dev_cfg, f"{command}  [{point}]", work)
        rows[point] = {m: {k: res["methods"][m][k] for k in SHOWN} for m in bench.methods}
        print(f"{point}: " + ", ".join(f"{m} NLL {r['nll']:.3f}" for m, r in rows[point].items()), flush=True)
    chosen = {m: min(rows, key=lambda p: rows[p][m]["nll"]) for m in adapting}
    flags = ["--adaptation", *(f"{m}={p}" for m, p in chosen.items())]
    out = {
        "split": split,
        "dev_tasks": res["tasks"],
        "seeds": list(bench.seeds),
        "test_k": res["test_k"],
        "selection": "lowest mean dev NLL",
        "grid": list(own.grid),
        "command": command,
        "rows": rows,
        "chosen": chosen,
        "flags": shlex.join(flags),
        "priors": res.get("priors", {}),
    }
    bench_report.write_results(f"tune_adaptation-{split}", out, markdown(out), out_dir)
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    methods = list(next(iter(out["rows"].values())))
    lines = [
        f"# Test-time adaptation chosen on dev data ({out['split']})",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Dev tasks (held out of meta-training; support = train file, query = dev file): "
        f"{', '.join(out['dev_tasks'])}; seeds {out['seeds']}; k = {out['test_k']}. Every method tries the "
        f"same grid (OPTIMIZER:STEPS:LR); chosen by {out['selection']} (**bold**).",
        "",
        "Dev NLL / accuracy / macro-F1 / ECE, mean over tasks:",
        "",
        *bench_report.choice_table(
            out["rows"], methods, out["chosen"], lambda r: " / ".join(bench_report.fmt(r[k]) for k in SHOWN)
        ),
    ]
    lines += ["", f"Flags for benchmarks/quality.py: `{out['flags']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
