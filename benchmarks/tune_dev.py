"""Choose the inner learning rate and prompt template on DEV data of meta-train tasks only.

For each candidate, adapt from the untrained prior on each task's k-shot support (train file)
and measure the query NLL / accuracy on the task's dev file. Writes
benchmarks/results/tune_dev.json and a Markdown table. Never touches test splits.

    .venv/bin/python benchmarks/tune_dev.py
"""

from __future__ import annotations

import itertools
import sys
import time

import bench_flags
import bench_report
import torch

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.config import TaskArgs
from abmll.episodes import episode_batches
from abmll.meta import adapt, predict_batches
from abmll.metrics import compute_metrics
from abmll.models import load_base_model
from abmll.scoring import ScoringConfig

TASKS = ["glue-sst2", "tweet_eval-sentiment", "ethos-gender"]
TEMPLATES = ["{input}\nAnswer:", "{input}\nThe answer is:"]
INNER_LRS = [0.1, 0.3, 1.0]
STEPS = 5


def main(argv: list[str] | None = None) -> None:
    bench_flags.parse(argv, script="tune_dev.py", description=__doc__.splitlines()[0])  # no flags but --help
    base, tok = load_base_model()
    model = BayesLoraModel(base, BayesLoraConfig(rank=4, alpha=8))
    prior = model.init_params()
    tasks = TaskArgs(k=8)
    rows = []
    for template, task in itertools.product(TEMPLATES, TASKS):
        scoring = ScoringConfig(template=template, max_length=128)
        ep = episode_batches(model, tok, task, 100, tasks, scoring, "dev", 32)
        zs = compute_metrics(*predict_batches(model, prior, ep.query, 0))
        rows.append(dict(template=template, task=task, inner_lr=0.0, **zs))
        for lr in INNER_LRS:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                post, hist = adapt(model, prior, ep.support, STEPS, lr, 1e-6, 1)
                m = compute_metrics(*predict_batches(model, post, ep.query, 0))
            except (FloatingPointError, ValueError) as err:
                hist, m = [], dict(accuracy=float("nan"), nll=float("inf"), ece=float("nan"), error=str(err))
            rows.append(dict(template=template, task=task, inner_lr=lr, support_nll=hist, seconds=time.perf_counter() - t0, **m))
            print(rows[-1], file=sys.stderr)
    lines = ["| template | task | inner lr | dev acc | dev NLL | dev ECE |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['template']!r} | {r['task']} | {r['inner_lr']} | {r['accuracy']:.3f} | {r['nll']:.3f} | {r['ece']:.3f} |"
        for r in rows
    ]
    bench_report.write_results("tune_dev", rows, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
