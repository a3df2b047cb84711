"""Choose the outer loop's settings (learning rate, warm-up, meta-gradient clipping) of every
trained prior (ABMLL, multi-task LoRA, Reptile) on meta-validation data, with the same search
budget for each: the same grid, meta-steps, train tasks, validation tasks and seeds. Never
touches a split's test tasks.

    .venv/bin/python benchmarks/tune_outer.py <quality.py flags, --val_tasks and
        --validate_every required> [--grid 0.001:0:0 0.003:25:1.0 ...] [--kinds abmll reptile]

Each grid point LR:WARMUP:CLIP meta-trains every prior kind for ``--meta_steps`` with
``outer_lr`` LR, ``outer_warmup_steps`` WARMUP and ``outer_grad_clip`` CLIP (0: none), scoring
it every ``--validate_every`` steps on the ``--val_tasks`` (train tasks held out of
meta-training; support = train file, query = dev file) after adapting it as the eval group
says (``--test_optimizer``, ``--test_steps``, ``--test_lr``: one recipe for every kind). The
point with the lowest best validation NLL is chosen per kind. Priors live in the quality
benchmark's work folder (:func:`harness.comparison_work_dir`) under the hash of their config,
so a killed search resumes and the test run reuses a chosen prior when its flags are the same.

Writes ``<out_dir>/tune_outer-<split>.{json,md}`` and prints the outer-loop flags of each choice.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field, replace

import bench_flags
import bench_report
import bench_tasks
import harness
import torch

GRID = ["0.001:0:0", "0.001:25:1.0", "0.003:25:1.0"]
"""LR:WARMUP:CLIP points: the setting the 500-step priors were trained with (Adam at 0.001,
constant, unclipped), the same with a 25-step warm-up and the meta-gradient's L2 norm clipped
at 1 (its norm is 0.05-3.6 over a run's first steps on SmolLM2), and three times the learning
rate with both."""


@dataclass
class OuterArgs:
    """Flags of this script beside benchmarks/quality.py's.

    Attributes:
        grid: LR:WARMUP:CLIP outer-loop settings tried for every prior kind (outer_lr,
            outer_warmup_steps, outer_grad_clip; CLIP 0 means no clipping).
        kinds: the trained prior kinds to tune (abmll, multitask, reptile).
    """

    grid: list[str] = field(default_factory=lambda: list(GRID))
    kinds: list[str] = field(default_factory=lambda: list(bench_flags.TRAINED_KINDS))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench, cfg, own = bench_flags.parse_bench(argv, extra=(OuterArgs,), script="tune_outer.py")
    val = list(cfg.tasks.val_tasks)
    if not val or not bench.validate_every:
        raise SystemExit("--val_tasks and --validate_every are required: the search compares validation NLL")
    if bench.validate_every > cfg.meta.meta_steps:
        raise SystemExit(
            f"--validate_every {bench.validate_every} > --meta_steps {cfg.meta.meta_steps}: no trained prior is validated"
        )
    if bench.outer or bench.fresh:
        raise SystemExit(
            "--outer and --fresh are not for this script: it sets the outer loop per grid point, and resumes what is done"
        )
    unknown = set(own.kinds) - set(bench_flags.TRAINED_KINDS)
    if unknown:
        raise SystemExit(f"--kinds takes {list(bench_flags.TRAINED_KINDS)}, got {sorted(unknown)}")
    points = {p: bench_flags.outer_point(p) for p in own.grid}
    for point, fields_ in points.items():
        try:
            replace(cfg.meta, **fields_)
        except ValueError as err:  # refused before any run
            raise SystemExit(f"--grid {point}: {err}") from None
    split = cfg.tasks.split
    work = bench_flags.comparison_work_dir(bench, cfg)
    out_dir = bench_flags.comparison_out_dir(bench)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    # the meta-train tasks of the test run, as tune_adaptation.py finds them: no test file is read
    dev = (replace(bench, eval_split="dev"), replace(cfg, tasks=replace(cfg.tasks, test_tasks=val)))
    _, train, notes = bench_tasks.resolve_tasks(*dev, need_train=True)
    model, tok = harness.build_model(cfg, work)
    rows: dict[str, dict] = {}
    for point, fields_ in points.items():
        point_cfg = replace(cfg, meta=replace(cfg.meta, **fields_))
        rows[point] = {}
        for kind in own.kinds:
            harness.train_kind(kind, model, tok, point_cfg, train, bench, work)
            folder = harness.prior_folder(kind, point_cfg, train, bench, work)
            curve = json.loads((folder / "validation.json").read_text())
            best = min(curve, key=lambda v: v["nll"])  # a failed validation has nll inf and no ece
            rows[point][kind] = {
                "best_step": best["step"],
                "best_nll": best["nll"],
                "best_ece": best.get("ece"),
                "curve": [[v["step"], v["nll"], v.get("ece")] for v in curve],
                "folder": str(folder),
            }
            print(f"{point} {kind}: best validation NLL {best['nll']:.3f} at step {best['step']}", flush=True)
    chosen = {k: min(rows, key=lambda p: rows[p][k]["best_nll"]) for k in own.kinds}
    out = {
        "split": split,
        "train_tasks": train,
        "val_tasks": val,
        "val_seeds": list(bench.val_seeds),
        "meta_steps": cfg.meta.meta_steps,
        "validate_every": bench.validate_every,
        "validation_adaptation": [cfg.eval.test_optimizer, cfg.eval.test_steps, cfg.eval.adapt_lr(cfg.meta)],
        "selection": "lowest best validation NLL",
        "grid": list(own.grid),
        "command": bench_report.command_line("tune_outer.py", argv),
        "rows": rows,
        "chosen": chosen,
        "untrained_best": [k for k in own.kinds if all(rows[p][k]["best_step"] == 0 for p in rows)],
        "flags": shlex.join(["--outer", *(f"{k}={p}" for k, p in chosen.items())]),
        "notes": notes,
    }
    bench_report.write_results(f"tune_outer-{split}", out, markdown(out), out_dir)
    print(markdown(out))
    return out


def best_cell(row: dict) -> str:
    return f"{bench_report.fmt(row['best_nll'])} / {bench_report.fmt(row['best_ece'])} ({row['best_step']})"


def markdown(out: dict) -> str:
    kinds = list(next(iter(out["rows"].values())))
    opt, steps, lr = out["validation_adaptation"]
    lines = [
        f"# Outer-loop settings chosen on meta-validation data ({out['split']})",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Every prior kind meta-trained {out['meta_steps']} steps per setting (LR:WARMUP:CLIP = outer_lr, "
        f"outer_warmup_steps, outer_grad_clip; 0 = no clipping) on {len(out['train_tasks'])} train tasks, "
        f"validated every {out['validate_every']} steps on {', '.join(out['val_tasks'])} (held out of "
        f"meta-training; support = train file, query = dev file) x seeds {out['val_seeds']}, adapted with "
        f"{steps} {opt} steps at lr {lr:g}. Chosen by {out['selection']} (**bold**).",
        "",
        "Best validation NLL / its ECE (at meta-step):",
        "",
        *bench_report.choice_table(out["rows"], kinds, out["chosen"], best_cell),
    ]
    lines += ["", "Validation NLL along meta-training (step 0: the untrained prior):", ""]
    steps_ = [s for s, _, _ in next(iter(next(iter(out["rows"].values())).values()))["curve"]]
    lines += ["| setting | kind | " + " | ".join(str(s) for s in steps_) + " |", "|---|---|" + "---|" * len(steps_)]
    for point, r in out["rows"].items():
        for k in kinds:
            lines.append(f"| {point} | {k} | " + " | ".join(bench_report.fmt(n) for _, n, _ in r[k]["curve"]) + " |")
    for k in out["untrained_best"]:
        lines += [
            "",
            f"**{k}: no setting improves on the untrained prior** (best at step 0 everywhere): its choice is arbitrary.",
        ]
    lines += ["", f"Flags of the choice for benchmarks/quality.py: `{out['flags']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
