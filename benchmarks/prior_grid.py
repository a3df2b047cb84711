"""The prior's own knobs (scale c = ``init_std_factor``, beta, K = ``inner_steps``) compared on
meta-validation NLL at one meta-step budget, from the validation curves of priors trained
alike but for those knobs (never from test tasks).

    .venv/bin/python benchmarks/prior_grid.py --max_step 250 --name prior-grid-class_to_class \\
        --points "c=0.1=src/abmll/priors/smollm2-135m-class_to_class/record.json" \\
                 "c=0.6=runs/prior-grid/c0.6/tune_outer-class_to_class.json" ...

Each point is ``LABEL=FILE``: a shipped prior's ``record.json`` (its ``validation`` list), a
run's ``validation.json``, or a :mod:`tune_outer` result (its ABMLL curve at its one grid
point). A curve of a longer run counts up to ``--max_step`` only: with a constant outer
learning rate after warm-up, the first ``max_step`` steps of a longer run are a run of
``max_step`` steps. The point with the lowest best validation NLL is chosen.

Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import bench_report

from abmll.args import parse_dataclasses


@dataclass
class GridArgs:
    """Flags of this script.

    Attributes:
        points: LABEL=FILE per grid point (record.json, validation.json or a tune_outer result).
        max_step: compare the curves up to this meta-step.
        name: results file name (benchmarks/results/<name>.{json,md}).
    """

    points: list[str] = field(default_factory=list)
    max_step: int = 250
    name: str = "prior-grid-class_to_class"


def read_curve(path: Path) -> list[dict]:
    """``[{"step", "nll", "ece"}, ...]`` of the validation curve in ``path``.

    Raises:
        SystemExit: naming ``path`` when it holds no curve this script knows.
    """
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data
    if "validation" in data:
        return data["validation"]
    if "rows" in data:
        (row,) = data["rows"].values()
        return [{"step": s, "nll": n, "ece": e} for s, n, e in row["abmll"]["curve"]]
    raise SystemExit(f"{path}: no validation curve (a record.json, validation.json or tune_outer result)")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = parse_dataclasses(argv, [GridArgs], "benchmarks/prior_grid.py", __doc__.split("\n\n")[0])
    if not args.points:
        raise SystemExit("--points LABEL=FILE ... is required")
    rows = {}
    for point in args.points:
        label, _, path = point.rpartition("=")
        curve = [v for v in read_curve(Path(path)) if v["step"] <= args.max_step]
        if not curve or curve[-1]["step"] < args.max_step:
            print(f"{label}: curve ends at step {curve[-1]['step'] if curve else None} < {args.max_step}: left out", flush=True)
            continue
        best = min(curve, key=lambda v: v["nll"])
        rows[label] = {
            "file": path,
            "curve": [[v["step"], v["nll"], v.get("ece")] for v in curve],
            "best_step": best["step"],
            "best_nll": best["nll"],
            "best_ece": best.get("ece"),
            "last_nll": curve[-1]["nll"],
        }
    if not rows:
        raise SystemExit(f"no point has a curve reaching step {args.max_step}")
    out = {
        "command": bench_report.command_line("prior_grid.py", argv),
        "max_step": args.max_step,
        "selection": "lowest best validation NLL up to max_step",
        "rows": rows,
        "chosen": min(rows, key=lambda k: rows[k]["best_nll"]),
    }
    bench_report.write_results(args.name, out, markdown(out))
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    steps = sorted({s for r in out["rows"].values() for s, *_ in r["curve"]})
    lines = [
        f"# The prior's knobs at {out['max_step']} meta-steps, on meta-validation NLL",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Validation NLL (ECE at the best step) of each prior every validation step up to "
        f"{out['max_step']}; chosen by {out['selection']} (**bold**).",
        "",
        "| point | " + " | ".join(f"step {s}" for s in steps) + " | best NLL (step) | ECE there |",
        "|---|" + "---|" * (len(steps) + 2),
    ]
    for label, r in out["rows"].items():
        at = {s: n for s, n, _ in r["curve"]}
        name = f"**{label}**" if label == out["chosen"] else label
        cells = [bench_report.fmt(at.get(s)) for s in steps]
        best = f"{bench_report.fmt(r['best_nll'])} ({r['best_step']}) | {bench_report.fmt(r['best_ece'])}"
        lines.append(f"| {name} | {' | '.join(cells)} | {best} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
