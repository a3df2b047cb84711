"""Top-L cached adaptation against all-layer adaptation, at equal wall time.

Each variant meta-trains ABMLL on SmolLM2 with the demo's settings (src/abmll/demo.yaml:
k=8 shots, 8 dev query examples, K=2 inner steps, B=2 tasks) on the usable class_to_class
train tasks minus the meta-validation tasks, for the same wall-clock budget:

- ``all``: adapters in every decoder layer (today's default; the frozen-layer cache is off,
  there is nothing below the adapters to cache);
- ``<L>``: adapters in the top L decoder layers, frozen layers below them cached per batch
  (``BayesLoraConfig.top_layers`` = L, :mod:`abmll.layer_cache`);
- ``<L>-nocache``: the same adapters without the cache (isolates what the cache buys).

The variants share one process and take turns (``--rounds`` rounds of budget / rounds each),
so machine load that drifts during the run reaches them alike. Reported per variant:
meta-steps per hour (steps done / training seconds), and the meta-validation query NLL and
ECE of the prior it reached, next to its untrained prior's: each validation task (held out of
meta-training) at each ``--val_seeds`` seed is adapted 5 SGD steps from the prior on its
k-shot train file and predicts its dev file (:class:`abmll.validation.Validator`).

Resumable: after each round every variant's trainer state and elapsed training time are saved
in ``--work_dir``; a rerun continues from there (``--fresh`` starts over).

    .venv/bin/python benchmarks/top_layers.py --variants all 4 8 4-nocache --minutes 6 --rounds 3

Writes benchmarks/results/efficiency-top_layers.{json,md}.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import bench_flags
import bench_report
import bench_tasks
import torch

from abmll.args import config_file_defaults
from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.checkpoint import write_json
from abmll.config import CONFIG_GROUPS, DEMO_CONFIG, RunConfig
from abmll.data import load_split
from abmll.models import load_base_model
from abmll.train import MetaTrainer
from abmll.validation import make_validator

RESULTS = bench_report.RESULTS
VAL_TASKS = ["tweet_eval-irony", "glue-mrpc", "ethos-directed_vs_generalized", "superglue-wic"]
"""Meta-validation tasks: class_to_class train tasks held out of meta-training (binary,
different domains: irony, paraphrase, hate-speech target, word sense)."""


def demo_config() -> RunConfig:
    """src/abmll/demo.yaml's settings as a run configuration (its task lists left out: this
    benchmark picks its own)."""
    flat = config_file_defaults(DEMO_CONFIG, list(CONFIG_GROUPS.values()))
    flat = {k: v for k, v in flat.items() if k not in ("train_tasks", "test_tasks")}
    return RunConfig(
        **{name: cls(**{f.name: flat[f.name] for f in fields(cls) if f.name in flat}) for name, cls in CONFIG_GROUPS.items()}
    )


def variant_lora(lora: BayesLoraConfig, variant: str) -> BayesLoraConfig:
    if variant == "all":
        return replace(lora, top_layers=0)
    top, _, nocache = variant.partition("-")
    return replace(lora, top_layers=int(top), frozen_cache_mb=0 if nocache else 4096)


@dataclass
class TopLayersArgs:
    """Flags of benchmarks/top_layers.py.

    Attributes:
        variants: adapted layers per variant: "all", or L (the top L layers, frozen ones
            below cached); "L-nocache" runs the top L without the cache.
        minutes: training wall time per variant (split over the rounds).
        rounds: alternating rounds, so every variant sees the machine's load alike.
        val_tasks: meta-validation tasks (train tasks held out; scored on their dev files).
        val_seeds: data seeds of the validation episodes.
        threads: torch intra-op threads.
        work_dir: where the runs' checkpoints live (a rerun resumes).
        fresh: delete work_dir first.
        merge_only: only copy efficiency-top_layers.json into efficiency.{json,md}.
    """

    variants: list[str] = field(default_factory=lambda: ["all", "4", "8"])
    minutes: float = 6.0
    rounds: int = 3
    val_tasks: list[str] = field(default_factory=lambda: list(VAL_TASKS))
    val_seeds: list[int] = field(default_factory=lambda: [100, 13])
    threads: int = 2
    work_dir: str = "runs/top_layers"
    fresh: bool = False
    merge_only: bool = False


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = bench_flags.parse(argv, TopLayersArgs, script="top_layers.py", description=__doc__.splitlines()[0])
    if args.merge_only:
        res = json.loads((RESULTS / "efficiency-top_layers.json").read_text())
        merge_into_efficiency(res)
        return res
    torch.set_num_threads(args.threads)
    command = bench_report.command_line("top_layers.py", argv)
    work = Path(args.work_dir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    g = demo_config()
    split = load_split(g.tasks.split)
    notes: list[str] = []
    train = bench_tasks.usable_tasks(
        [t for t in split["train"] if t not in args.val_tasks],
        g.tasks,
        g.tasks.data_seeds,
        "dev",
        notes,
        "meta-train",
        max_options=10,
    )
    print(f"{len(train)} meta-train tasks; validation: {args.val_tasks} x seeds {args.val_seeds}", flush=True)
    tasks = replace(g.tasks, train_tasks=train)

    runs = {}
    for v in args.variants:
        base, tok = load_base_model()
        model = BayesLoraModel(base, variant_lora(g.lora, v))
        trainer = MetaTrainer(model, tok, train, tasks, replace(g.meta, meta_steps=10**6), g.hyperprior, g.scoring)
        folder = work / v
        state = json.loads((folder / "elapsed.json").read_text()) if (folder / "elapsed.json").is_file() else None
        if state:
            trainer.resume(folder)
        validator = make_validator(model, tok, args.val_tasks, args.val_seeds, tasks, g.scoring, g.meta, g.eval)
        runs[v] = dict(
            model=model,
            trainer=trainer,
            folder=folder,
            validator=validator,
            elapsed=state["elapsed"] if state else 0.0,
            rounds=state["rounds"] if state else 0,
            untrained=state.get("untrained") if state else None,
            per_round=state.get("per_round", []) if state else [],
        )
        print(
            f"variant {v}: {len(model.layers)} adapted modules, {model.num_weight_entries():,} weight entries, "
            f"cache {'off' if model.frozen_cache is None else 'on'}",
            flush=True,
        )

    budget = args.minutes * 60 / args.rounds
    config = {"benchmark": "top_layers"}
    for r in range(args.rounds):
        for v, run in runs.items():
            if run["rounds"] > r:
                continue
            if run["untrained"] is None:
                run["untrained"] = run["validator"](run["model"].init_params())
            t0, before = time.perf_counter(), len(run["trainer"].history)
            while time.perf_counter() - t0 < budget:
                logs = run["trainer"].step()
            spent = time.perf_counter() - t0
            run["elapsed"] += spent
            run["rounds"] = r + 1
            run["per_round"].append({"steps": len(run["trainer"].history) - before, "seconds": round(spent, 1)})
            run["trainer"].save(run["folder"], config)
            write_json(
                run["folder"] / "elapsed.json",
                {
                    "elapsed": run["elapsed"],
                    "rounds": run["rounds"],
                    "untrained": run["untrained"],
                    "per_round": run["per_round"],
                },
            )
            print(
                f"round {r + 1}/{args.rounds} {v}: {len(run['trainer'].history)} meta-steps in {run['elapsed']:.0f} s "
                f"(query NLL {logs.get('query_nll', float('nan')):.3f})",
                flush=True,
            )

    rows = []
    for v, run in runs.items():
        t0 = time.perf_counter()
        reached = run["validator"](run["trainer"].theta)
        steps = len(run["trainer"].history)
        cache = run["model"].frozen_cache
        rows.append(
            dict(
                variant=v,
                top_layers=run["model"].config.top_layers or "all",
                cached=cache is not None,
                meta_steps=steps,
                train_seconds=round(run["elapsed"], 1),
                meta_steps_per_hour=round(3600 * steps / run["elapsed"], 1),
                weight_entries=run["model"].num_weight_entries(),
                val_nll_untrained=run["untrained"]["nll"],
                val_ece_untrained=run["untrained"]["ece"],
                val_nll=reached["nll"],
                val_ece=reached["ece"],
                val_accuracy=reached["accuracy"],
                val_macro_f1=reached["macro_f1"],
                val_seconds=round(time.perf_counter() - t0, 1),
                cache_hits=cache.hits if cache else None,
                cache_misses=cache.misses if cache else None,
                cache_mb=round(cache.nbytes / 2**20, 1) if cache else None,
                seconds_per_step_by_round=[round(x["seconds"] / max(x["steps"], 1), 2) for x in run["per_round"]],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    ref = next((r for r in rows if r["variant"] == "all"), None)
    for row in rows:
        row["speedup_vs_all"] = round(row["meta_steps_per_hour"] / ref["meta_steps_per_hour"], 2) if ref else None
    res = dict(
        command=command,
        model="smollm2-135m-instruct",
        device="cpu (float32)",
        threads=args.threads,
        minutes_per_variant=args.minutes,
        rounds=args.rounds,
        val_tasks=args.val_tasks,
        val_seeds=args.val_seeds,
        train_tasks=train,
        notes=notes,
        settings={k: asdict(v) for k, v in g.items()},
        rows=rows,
    )
    bench_report.write_results("efficiency-top_layers", res, markdown(res))
    merge_into_efficiency(res)
    return res


MARK = "<!-- top_layers rows: written by benchmarks/top_layers.py -->"


def merge_into_efficiency(res: dict) -> None:
    """Add the rows to benchmarks/results/efficiency.{json,md} (replacing an earlier copy), so the
    efficiency results hold the all-layer vs top-L comparison beside the per-step ratios."""
    path = RESULTS / "efficiency.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["top_layers_equal_wall_time"] = res
    write_json(path, data)
    md = RESULTS / "efficiency.md"
    text = md.read_text().split(MARK)[0].rstrip() + "\n\n" if md.is_file() else ""
    md.write_text(text + MARK + "\n\n## " + markdown(res))


def markdown(res: dict) -> str:
    lines = [
        f"Top-L cached vs all-layer ABMLL meta-training at equal wall time ({res['model']}, {res['device']}, "
        f"{res['threads']} threads; {res['minutes_per_variant']} min per variant in {res['rounds']} alternating "
        f"rounds); command: `{res['command']}`",
        "",
        f"Meta-validation: {', '.join(res['val_tasks'])} (held out of meta-training) x seeds {res['val_seeds']}; "
        "5 SGD steps from the prior on the k-shot train file, then the dev file's query NLL / ECE.",
        "",
        "| variant | adapted layers | cache | meta-steps | meta-steps / hour | speed-up | val NLL (untrained -> reached) "
        "| val ECE (untrained -> reached) | cache hits / misses | s / step by round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['variant']} | {r['top_layers']} | {'yes' if r['cached'] else 'no'} | {r['meta_steps']} | "
            f"{r['meta_steps_per_hour']} | {r['speedup_vs_all']}x | {r['val_nll_untrained']:.3f} -> "
            f"{r['val_nll']:.3f} | {r['val_ece_untrained']:.3f} -> {r['val_ece']:.3f} | "
            f"{r['cache_hits']} / {r['cache_misses']} | {r['seconds_per_step_by_round']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
