"""Test-time cost: ABMLL's adapt + predict per (task, seed) against plain LoRA's, in one process.

One unit is what the quality benchmark times per (method, task, seed): adaptation on the task's
k-shot support set, then prediction of its query set, at the table of record's settings (the
shipped SmolLM2 prior's scoring and adapter; k = 16, up to 64 query examples, 10 AdamW steps
at lr 0.01). ABMLL takes one weight sample per adaptation step and ``--eval_samples`` S draws in
prediction; LoRA is deterministic and predicts once with its mean. Placements and modes:
  - ``top_layers`` L > 0 (the shipped prior's 4): adapters in the top L decoder layers; the
    frozen layers below run once per batch (:mod:`abmll.layer_cache`), only the top L and the
    LM head (at the scored positions) once per step and per draw.
    ``cold``: the cache is cleared before each unit, so each pays its own frozen pass, as a
    user running one method does; ``warm``: the frozen pass is done before the clock starts,
    as for every method after the first on an episode in ``abmll evaluate`` and the quality
    benchmark (whose seconds per unit are warm for all but the first method).
  - ``top_layers`` 0: adapters in every layer; every step and draw runs the whole model.
Methods, placements and tasks run in turn for ``--rounds`` rounds; the ratio ABMLL / LoRA is
taken per round (same load for both) and its median reported. The adapter's values do not
change the work done, so both start from the initial prior (LoRA from its mean).

    .venv/bin/python benchmarks/test_time.py [--top_layers 4 0] [--rounds 2] [--threads 2]

Writes benchmarks/results/efficiency-test_time.json and .md.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import bench_flags
import bench_report
import torch

from abmll.bayes_lora import BayesLoraModel
from abmll.config import EvalArgs, TaskArgs, from_dict
from abmll.episodes import episode_batches
from abmll.evaluate import predict_method
from abmll.export import load_adapter_folder
from abmll.meta import MetaConfig, predict_samples
from abmll.methods import make_method
from abmll.models import load_base_model
from abmll.priors import resolve_adapter

METHODS = ("lora", "abmll")


@dataclass
class TestTimeArgs:
    """Test-time cost of ABMLL against plain LoRA.

    Attributes:
        tasks: class_to_class test tasks timed (one unit each per method and round).
        seed: data seed of each task's k-shot files.
        top_layers: adapter placements timed (0: every decoder layer; L: the top L layers).
        eval_samples: S, ABMLL's weight draws in prediction.
        rounds: rounds of every (placement, method, task); the ratio is the median over rounds.
        threads: torch intra-op threads.
        note: how the machine was loaded during the run (written into the results).
        name: results file stem under benchmarks/results.
    """

    tasks: list[str] = field(default_factory=lambda: ["ethos-race", "tweet_eval-hate", "ag_news"])
    seed: int = 100
    top_layers: list[int] = field(default_factory=lambda: [4, 0])
    eval_samples: int = 4
    rounds: int = 2
    threads: int = 2
    note: str = ""
    name: str = "efficiency-test_time"


def unit_seconds(model: BayesLoraModel, method, episode, meta: MetaConfig, seed: int, warm: bool) -> float:
    """Wall seconds of one unit: adapt on the support set, then predict the query set. The
    frozen-layer cache (if any) is cleared first; ``warm``: then filled before the clock starts."""
    if model.frozen_cache is not None:
        model.frozen_cache.clear()
        if warm:
            predict_samples(model, method.prior, [*episode.support, *episode.query], 0)
    start = time.perf_counter()
    predict_method(model, method, episode, meta, seed)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = bench_flags.parse(argv, TestTimeArgs, script="test_time.py")
    torch.set_num_threads(args.threads)
    _, saved = load_adapter_folder(resolve_adapter("smollm2-135m-class_to_class"))
    scoring, lora = from_dict(saved, "scoring"), from_dict(saved, "lora")
    tasks, meta = TaskArgs(k=16), MetaConfig()
    ev = EvalArgs(test_steps=10, test_optimizer="adamw", test_lr=0.01, eval_samples=args.eval_samples)
    setups = {}
    for top in args.top_layers:  # a base model each: the adapters are injected into it
        base, tok = load_base_model()
        model = BayesLoraModel(base, replace(lora, top_layers=top))
        episodes = [episode_batches(model, tok, t, args.seed, tasks, scoring, "test", 64) for t in args.tasks]
        prior = model.init_params()
        for mode in ("cold", "warm") if top else ("all layers",):
            setups[f"top {top}, {mode}" if top else mode] = (
                model,
                episodes,
                {m: make_method(m, prior, ev) for m in METHODS},
                mode,
            )
    seconds = {name: {m: [] for m in METHODS} for name in setups}  # per round: mean over tasks
    for r in range(args.rounds):
        for name, (model, episodes, methods, mode) in setups.items():
            for method_name, method in methods.items():
                total = sum(unit_seconds(model, method, ep, meta, args.seed, mode == "warm") for ep in episodes)
                seconds[name][method_name].append(total / len(episodes))
                print(f"round {r + 1} {name} {method_name}: {total / len(episodes):.2f} s per unit", flush=True)
    result = {
        "command": bench_report.command_line("test_time.py", argv),
        "note": args.note,
        "settings": {
            "k": tasks.k,
            "max_test": 64,
            "adaptation": "adamw:10:0.01",
            "eval_samples": args.eval_samples,
            "max_length": scoring.max_length,
            "threads": args.threads,
        },
        "tasks": args.tasks,
        "seconds_per_unit": seconds,
        "ratio_abmll_lora": {
            name: statistics.median(a / b for a, b in zip(s["abmll"], s["lora"])) for name, s in seconds.items()
        },
    }
    bench_report.write_results(args.name, result, markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# Test-time cost: ABMLL vs plain LoRA per (task, seed)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"One unit = adaptation ({s['adaptation']}, k = {s['k']}) + prediction of up to {s['max_test']} query "
        f"examples, max_length {s['max_length']}, {s['threads']} threads; ABMLL with {s['eval_samples']} weight draws, "
        f"LoRA with its mean. Tasks: {', '.join(result['tasks'])}. "
        "Ratio: ABMLL / LoRA within each round, median over rounds. " + (result["note"] or ""),
        "",
        "| adapted layers, frozen pass | LoRA s / unit (per round) | ABMLL s / unit (per round) | ratio ABMLL / LoRA |",
        "|---|---|---|---|",
    ]
    for name, by in result["seconds_per_unit"].items():
        row = [", ".join(f"{x:.2f}" for x in by[m]) for m in METHODS]
        lines.append(f"| {name} | {row[0]} | {row[1]} | {result['ratio_abmll_lora'][name]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
