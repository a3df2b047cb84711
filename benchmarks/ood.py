"""Out-of-distribution check on SmolLM2: a posterior adapted on task A scores A's test examples
and task B's; how well does its uncertainty tell B's apart (AUROC by predictive entropy and by
epistemic uncertainty, abmll.ood)? For ABMLL (a meta-trained prior), Bayesian LoRA (the ABMLL
inner loop from the untrained prior) and LoRA (deterministic: no epistemic part).

    .venv/bin/python benchmarks/ood.py [--prior smollm2-135m-class_to_class] [--pairs A:B ...] [--seeds 100 13]

Settings (model, adapter, scoring, adaptation budget, samples) are src/abmll/demo.yaml's,
overridable by the same flags as ``abmll evaluate``. Each (method, pair, seed) result is
cached in ``runs/ood/cache.json`` as it finishes, keyed by the settings and the tensors the
method adapts from (a rerun computes only what is missing; a changed prior is recomputed);
results go to benchmarks/results/ood-class_to_class.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_report import command_line, write_results

from abmll.args import ALL_GROUPS, parse_args
from abmll.checkpoint import write_json
from abmll.commands.evaluate import task_files_digest
from abmll.config import DEMO_CONFIG, group_dict
from abmll.episodes import episode_batches
from abmll.loading import build_model, fitting_prior
from abmll.methods import make_method
from abmll.ood import ood_detection
from abmll.outputs import settings_hash, tensor_digest

PAIRS = ["ethos-race:ag_news", "tweet_eval-hate:anli", "ag_news:emo"]
METHODS = ["lora", "bayes_lora", "abmll"]


@dataclass
class OodArgs:
    """Flags of this script beside ``abmll evaluate``'s.

    Attributes:
        prior: the ABMLL prior (a shipped prior's short name or a folder).
        pairs: IN:OOD task pairs: adapt on IN's support set, flag OOD's test examples.
        seeds: data seeds (k-shot support sets) per pair.
    """

    prior: str = "smollm2-135m-class_to_class"
    pairs: list[str] = field(default_factory=lambda: list(PAIRS))
    seeds: list[int] = field(default_factory=lambda: [100, 13])


def main(argv: list[str]) -> dict:
    _, cfg, (args,) = parse_args(
        ["--config", str(DEMO_CONFIG), "--max_test", "48", "--eval_samples", "4", *argv],
        ALL_GROUPS,
        extra=(OodArgs,),
        command="ood",
    )
    prior, pairs, seeds = args.prior, args.pairs, args.seeds
    if bad := [p for p in pairs if p.count(":") != 1]:
        raise SystemExit(f"--pairs takes IN:OOD task pairs, got {bad}")
    torch.set_num_threads(2)
    model, tok = build_model(cfg)
    priors = {"lora": model.init_params(), "bayes_lora": model.init_params(), "abmll": fitting_prior(prior, model)[0]}
    work = Path("runs/ood")
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    groups = {g: group_dict(getattr(cfg, g)) for g in ("model", "lora", "scoring", "meta", "eval")}
    # keyed by the tensors each method adapts from, not the prior's name (a shipped prior
    # replaced under the same name must not reuse results), and by the pair's task files
    starts = {name: tensor_digest(priors[name]) for name in METHODS}
    files = {pair: task_files_digest(pair.split(":"), cfg.tasks) for pair in pairs}

    def key(name: str, pair: str, seed: int) -> str:
        return f"{settings_hash(groups | {'prior': starts[name], 'data': files[pair]})}|{name}|{pair}|{seed}"

    start = time.perf_counter()
    for pair in pairs:
        task, other = pair.split(":")
        for seed in seeds:
            episode = ood_query = None
            for name in METHODS:
                if key(name, pair, seed) in cache:
                    continue
                if episode is None:
                    episode = episode_batches(model, tok, task, seed, cfg.tasks, cfg.scoring, "test", cfg.eval.max_test)
                    ood_query = episode_batches(model, tok, other, seed, cfg.tasks, cfg.scoring, "test", cfg.eval.max_test).query
                method = make_method(name, priors[name], cfg.eval)
                result = cache[key(name, pair, seed)] = ood_detection(model, method, episode, ood_query, cfg.meta, seed)
                write_json(cache_path, cache)
                print(f"{name:10s} {pair:28s} seed {seed}: {result} ({time.perf_counter() - start:.0f} s)", flush=True)
    table = {
        name: {
            pair: {k: statistics.fmean(cache[key(name, pair, s)][k] for s in seeds) for k in ("auroc_total", "auroc_epistemic")}
            for pair in pairs
        }
        for name in METHODS
    }
    command = command_line("ood.py", argv)
    results = {
        "command": command,
        "prior": prior,
        "pairs": pairs,
        "seeds": seeds,
        "methods": table,
        "config": {g: groups[g] for g in ("lora", "scoring", "meta", "eval")},
    }
    lines = [
        "# Out-of-distribution check: class_to_class test tasks, SmolLM2-135M-Instruct",
        "",
        f"Command: `{command}`",
        "",
        f"Adapted on the in-distribution task's k={cfg.tasks.k} support set ({cfg.eval.test_steps} steps), "
        f"then {cfg.eval.max_test} test examples of each task scored with {cfg.eval.eval_samples} weight "
        f"samples (LoRA: the posterior mean). AUROC of flagging the OOD task's examples (0.5 = chance), mean "
        f"over seeds {seeds}. ABMLL prior: {prior}.",
        "",
        "| method | in-distribution -> OOD task | AUROC by entropy | AUROC by epistemic (MI) |",
        "|---|---|---|---|",
    ]
    for name in METHODS:
        for pair in pairs:
            r = table[name][pair]
            lines.append(f"| {name} | {pair.replace(':', ' -> ')} | {r['auroc_total']:.3f} | {r['auroc_epistemic']:.3f} |")
    write_results("ood-class_to_class", results, "\n".join(lines))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
