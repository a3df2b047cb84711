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

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.config import RunConfig
from abmll.episodes import episode_batches
from abmll.evaluate import Method, adapt_method
from abmll.meta import MetaConfig, TaskBatches, predict_samples
from abmll.scoring import OptionBatch
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
    if torch.unique(scores).numel() == 1:  # every score tied (e.g. epistemic 0 without samples)
        return 0.5
    return float(binary_auroc(scores, target))


def ood_detection(
    model: BayesLoraModel, method: Method, episode: TaskBatches, ood_query: Sequence[OptionBatch], meta: MetaConfig, seed: int
) -> dict[str, float]:
    """Adapt ``method`` on ``episode``'s support set (as :func:`abmll.evaluate.run_method`),
    then :func:`posterior_ood_auroc` of that posterior on ``episode``'s query set against
    ``ood_query``."""
    posterior = adapt_method(model, method, episode, meta, seed)
    return posterior_ood_auroc(model, posterior, method.samples, episode.query, ood_query, seed)


def posterior_ood_auroc(
    model: BayesLoraModel,
    posterior: Params,
    n_samples: int,
    query: Sequence[OptionBatch],
    ood_query: Sequence[OptionBatch],
    seed: int,
) -> dict[str, float]:
    """Predict ``query`` (in-distribution) and ``ood_query`` with ``n_samples`` weight samples
    of ``posterior`` (seeded with ``seed``) and return ``{"auroc_total", "auroc_epistemic"}``:
    the AUROC of each uncertainty (:func:`abmll.uncertainty.decompose`) at flagging the
    out-of-distribution examples. Without weight samples the epistemic part is 0 everywhere
    and its AUROC 0.5."""
    torch.manual_seed(seed)
    inside = decompose(predict_samples(model, posterior, query, n_samples)[0])
    outside = decompose(predict_samples(model, posterior, ood_query, n_samples)[0])
    return {f"auroc_{kind}": auroc(inside[kind], outside[kind]) for kind in UNCERTAINTY_KINDS}


def ood_table(
    model: BayesLoraModel, tokenizer, methods: Sequence[Method], task_names: Sequence[str], cfg: RunConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`ood_detection` for every method, test task (in-distribution) and ``eval.ood_tasks``
    task other than it, averaged over the data seeds: ``{method: {"<task> -> <ood task>":
    {"auroc_total", "auroc_epistemic"}}}``. Each task's episode is built and each method
    adapted once per seed, whatever the number of OOD tasks."""
    tasks, ev, scoring, meta = cfg.tasks, cfg.eval, cfg.scoring, cfg.meta
    runs: dict[str, dict[str, list[dict]]] = {m.name: {} for m in methods}
    for seed in tasks.data_seeds:
        episodes = {
            name: episode_batches(model, tokenizer, name, seed, tasks, scoring, "test", ev.max_test)
            for name in dict.fromkeys([*task_names, *ev.ood_tasks])
        }
        for task in task_names:
            others = [t for t in ev.ood_tasks if t != task]
            for m in methods if others else ():
                posterior = adapt_method(model, m, episodes[task], meta, seed)
                for other in others:
                    runs[m.name].setdefault(f"{task} -> {other}", []).append(
                        posterior_ood_auroc(model, posterior, m.samples, episodes[task].query, episodes[other].query, seed)
                    )
    return {
        name: {pair: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for pair, rs in pairs.items()}
        for name, pairs in runs.items()
    }


def format_ood_table(table: dict) -> str:
    """The :func:`ood_table` as Markdown: one row per (method, task pair)."""
    lines = ["| method | in-distribution -> OOD task | AUROC by entropy | AUROC by epistemic (MI) |", "|---|---|---|---|"]
    for method, pairs in table.items():
        for pair, r in pairs.items():
            lines.append(f"| {method} | {pair} | {r['auroc_total']:.3f} | {r['auroc_epistemic']:.3f} |")
    return "\n".join(lines)
