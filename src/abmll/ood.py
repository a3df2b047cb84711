"""Out-of-distribution check: does a posterior adapted on one task know when it is shown
another task's examples? As Bayesian LoRA papers report it: adapt on task A's support set,
predict A's query examples (in-distribution) and task B's (out-of-distribution), and measure
how well an uncertainty score tells them apart (AUROC; 0.5 = not at all, 1 = perfectly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from abmll.bayes_lora import BayesLoraModel
from abmll.evaluate import Method, adapt_method
from abmll.meta import MetaConfig, TaskBatches, predict_samples
from abmll.scoring import OptionBatch
from abmll.train import episode_batches
from abmll.uncertainty import UNCERTAINTY_KINDS, decompose


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """AUROC of telling ``out_scores`` (positives) from ``in_scores`` (negatives) by the score,
    higher = more likely out-of-distribution: P(out > in) + P(out == in) / 2 (torchmetrics'
    ``binary_auroc``; scores (N_in,), (N_out,)).

    Raises:
        ValueError: either set is empty.
    """
    if not len(in_scores) or not len(out_scores):
        raise ValueError("auroc needs at least one in- and one out-of-distribution example")
    scores = torch.cat([in_scores, out_scores]).double()
    target = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).long()
    if torch.unique(scores).numel() == 1:             # every score tied (e.g. epistemic 0 without samples)
        return 0.5
    return float(binary_auroc(scores, target))


def ood_detection(model: BayesLoraModel, method: Method, episode: TaskBatches, ood_query: Sequence[OptionBatch],
                  meta: MetaConfig, seed: int) -> dict[str, float]:
    """Adapt ``method`` on ``episode``'s support set (as :func:`abmll.evaluate.run_method`),
    predict its query set and ``ood_query`` with ``method.samples`` weight samples, and return
    ``{"auroc_total", "auroc_epistemic"}``: the AUROC of each uncertainty
    (:func:`abmll.uncertainty.decompose`) at flagging the out-of-distribution examples.
    Without weight samples the epistemic part is 0 everywhere and its AUROC 0.5."""
    posterior = adapt_method(model, method, episode, meta, seed)
    torch.manual_seed(seed)
    inside = decompose(predict_samples(model, posterior, episode.query, method.samples)[0])
    outside = decompose(predict_samples(model, posterior, ood_query, method.samples)[0])
    return {f"auroc_{kind}": auroc(inside[kind], outside[kind]) for kind in UNCERTAINTY_KINDS}


def ood_table(model: BayesLoraModel, tokenizer, methods: Sequence[Method], task_names: Sequence[str], cfg: dict
              ) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`ood_detection` for every method, test task (in-distribution) and ``eval.ood_tasks``
    task other than it, averaged over the data seeds: ``{method: {"<task> -> <ood task>":
    {"auroc_total", "auroc_epistemic"}}}``."""
    tasks, ev, scoring, meta = cfg["tasks"], cfg["eval"], cfg["scoring"], cfg["meta"]
    table = {m.name: {} for m in methods}
    for task in task_names:
        for other in [t for t in ev.ood_tasks if t != task]:
            runs = {m.name: [] for m in methods}
            for seed in tasks.data_seeds:
                episode = episode_batches(model, tokenizer, task, seed, tasks, scoring, "test", ev.max_test)
                ood_query = episode_batches(model, tokenizer, other, seed, tasks, scoring, "test", ev.max_test).query
                for m in methods:
                    runs[m.name].append(ood_detection(model, m, episode, ood_query, meta, seed))
            for name, rs in runs.items():
                table[name][f"{task} -> {other}"] = {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]}
    return table


def format_ood_table(table: dict) -> str:
    """The :func:`ood_table` as Markdown: one row per (method, task pair)."""
    lines = ["| method | in-distribution -> OOD task | AUROC by entropy | AUROC by epistemic (MI) |",
             "|---|---|---|---|"]
    for method, pairs in table.items():
        for pair, r in pairs.items():
            lines.append(f"| {method} | {pair} | {r['auroc_total']:.3f} | {r['auroc_epistemic']:.3f} |")
    return "\n".join(lines)
