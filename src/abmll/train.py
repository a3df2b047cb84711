"""Meta-training: sample meta-batches of tasks, run first-order ABMLL steps, save the prior.

Method doc, "Meta-objective". The loop is deliberately plain: episodes are tokenised once and
cached, each meta-step is :func:`abmll.meta.meta_step`, and the prior is written as an
adapter folder (:mod:`abmll.checkpoint`) every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from abmll.bayes_lora import BayesLoraModel, HyperpriorConfig, Params
from abmll.checkpoint import save_adapter, write_json
from abmll.config import TaskArgs
from abmll.data import check_tasks, load_episode, load_split
from abmll.meta import MetaConfig, TaskBatches, meta_step
from abmll.scoring import ScoringConfig, make_batches


def episode_batches(model: BayesLoraModel, tokenizer, task: str, seed: int, tasks: TaskArgs,
                    scoring: ScoringConfig, query_split: str, max_query: int | None) -> TaskBatches:
    """Load and tokenise one episode (support = train file of (k, seed); query = ``query_split``),
    on the model's device."""
    ep = load_episode(task, tasks.k, seed, query_split, max_query, tasks.data_dir)
    device = next(model.parameters()).device
    to = lambda examples: [b.to(device) for b in make_batches(tokenizer, examples, scoring)]  # noqa: E731
    return TaskBatches(task, to(ep.support), to(ep.query))


@dataclass
class MetaTrainer:
    """State of one meta-training run: theta, its Adam optimiser, the task sampler, the log.

    Attributes:
        theta: prior adapter tensors (leaf tensors, float32), trained in place.
        history: one dict of logs per finished meta-step (see :func:`abmll.meta.meta_step`).
    """

    model: BayesLoraModel
    tokenizer: object
    task_names: list[str]
    tasks: TaskArgs
    meta: MetaConfig
    hyper: HyperpriorConfig
    scoring: ScoringConfig

    def __post_init__(self) -> None:
        if not self.task_names:
            raise ValueError("meta-training needs at least one task")
        torch.manual_seed(self.meta.seed)
        self.rng = random.Random(self.meta.seed)
        self.theta: Params = {k: v.clone().requires_grad_() for k, v in self.model.init_params().items()}
        self.optimizer = torch.optim.Adam(self.theta.values(), lr=self.meta.outer_lr)
        self.history: list[dict[str, float]] = []
        self._episodes: dict[tuple[str, int], TaskBatches] = {}

    def _episode(self, task: str, seed: int) -> TaskBatches:
        if (task, seed) not in self._episodes:
            self._episodes[(task, seed)] = episode_batches(
                self.model, self.tokenizer, task, seed, self.tasks, self.scoring, "dev", self.tasks.max_query)
        return self._episodes[(task, seed)]

    def sample_meta_batch(self) -> list[TaskBatches]:
        """B distinct tasks (with replacement when fewer than B), each with a random data seed."""
        B = self.meta.meta_batch_size
        names = self.rng.sample(self.task_names, B) if B <= len(self.task_names) else \
            [self.rng.choice(self.task_names) for _ in range(B)]
        return [self._episode(t, self.rng.choice(self.tasks.data_seeds)) for t in names]

    def step(self) -> dict[str, float]:
        """One meta-step; appends and returns its logs (with ``step`` and ``tasks``)."""
        step = len(self.history)
        batch = self.sample_meta_batch()
        logs = meta_step(self.model, self.theta, self.optimizer, batch, self.meta, self.hyper, step)
        logs = {"step": step, **logs, "tasks": [t.task for t in batch]}
        self.history.append(logs)
        return logs

    def save(self, folder: str | Path, config: dict) -> Path:
        """Write the prior (adapter folder with ``config``) and ``history.json`` into ``folder``."""
        save_adapter(folder, self.theta, {**config, "kind": "prior", "rho0": self.rho0(),
                                          "meta_steps_done": len(self.history)})
        write_json(Path(folder) / "history.json", self.history)
        return Path(folder)

    def rho0(self) -> dict[str, float]:
        return {L.name: L.rho0 for L in self.model.layers}

    def run(self, out_dir: str | Path | None, config: dict, save_every: int = 0,
            on_step: Callable[[dict], None] | None = None) -> Params:
        """Run ``meta.meta_steps`` steps, saving to ``out_dir`` every ``save_every`` steps (0: only
        at the end) and calling ``on_step(logs)`` after each. Returns theta (detached)."""
        while len(self.history) < self.meta.meta_steps:
            logs = self.step()
            if on_step:
                on_step(logs)
            if out_dir and save_every and len(self.history) % save_every == 0:
                self.save(out_dir, config)
        if out_dir:
            self.save(out_dir, config)
        return {k: v.detach() for k, v in self.theta.items()}


def task_names(tasks: TaskArgs, split_part: str) -> list[str]:
    """The explicit ``tasks.train_tasks`` / ``tasks.test_tasks`` list for ``split_part``
    "train" / "test", else that part of the split, checked for presence (see
    :func:`abmll.data.check_tasks`)."""
    explicit = tasks.train_tasks if split_part == "train" else tasks.test_tasks
    names: Sequence[str] = explicit or load_split(tasks.split, tasks.data_dir)[split_part]
    return check_tasks(names, tasks.data_dir, skip_missing=tasks.skip_missing)
