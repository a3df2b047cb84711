"""Episodes: one task's support and query sets, tokenised (:func:`episode_batches`), and which
episodes each meta-batch holds (:class:`EpisodeSampler`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from abmll.bayes_lora import BayesLoraModel
from abmll.config import TaskArgs
from abmll.data import Example, load_episode
from abmll.meta import TaskBatches
from abmll.scoring import ScoringConfig, make_batches


def episode_batches(
    model: BayesLoraModel,
    tokenizer,
    task: str,
    seed: int,
    tasks: TaskArgs,
    scoring: ScoringConfig,
    query_split: str,
    max_query: int | None,
    folds: int = 0,
) -> TaskBatches:
    """Load and tokenise one episode (support = train file of (k, seed); query = ``query_split``),
    on the model's device; in-context demonstrations (``scoring.demonstrations``) come from the
    support. ``folds`` > 0 also builds the support's :func:`kfold_split` (``TaskBatches.folds``;
    each fold's demonstrations come from the rest of the support).

    Raises:
        ValueError: ``folds`` is 1 or more than the support's size.
    """
    ep = load_episode(task, tasks.k, seed, query_split, max_query, tasks.data_dir)
    device = next(model.parameters()).device

    def to(examples, pool):
        return [b.to(device) for b in make_batches(tokenizer, examples, scoring, pool)]

    splits = kfold_split(ep.support, folds, seed) if folds else []
    return TaskBatches(
        task,
        to(ep.support, ep.support),
        to(ep.query, ep.support),
        folds=[TaskBatches(f"{task} (fold {i})", to(rest, rest), to(held, rest)) for i, (rest, held) in enumerate(splits)],
    )


def kfold_split(examples: list[Example], folds: int, seed: int) -> list[tuple[list[Example], list[Example]]]:
    """``folds`` (rest, held-out) splits of ``examples``, stratified by label: examples sorted by
    label (ties in a ``random.Random(seed)`` order) are dealt to the folds in turn, so each
    fold holds every class about in proportion. Every example is held out exactly once.

    Raises:
        ValueError: ``folds`` < 2 or more than ``len(examples)``.
    """
    if not 2 <= folds <= len(examples):
        raise ValueError(f"k-fold split needs 2 <= folds <= {len(examples)} examples, got folds={folds}")
    rng = random.Random(seed)
    keys = [rng.random() for _ in examples]
    order = sorted(range(len(examples)), key=lambda i: (examples[i].label, keys[i]))
    fold_of = {i: pos % folds for pos, i in enumerate(order)}
    return [
        ([e for i, e in enumerate(examples) if fold_of[i] != f], [e for i, e in enumerate(examples) if fold_of[i] == f])
        for f in range(folds)
    ]


@dataclass
class EpisodeSampler:
    """Which episodes each meta-batch holds: ``meta_batch_size`` distinct tasks (with
    replacement when there are fewer tasks), each with a random data seed, drawn from a
    ``random.Random(seed)`` whose state is saved with the run (:meth:`state_dict`)."""

    task_names: list[str]
    data_seeds: list[int]
    meta_batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def sample(self) -> list[tuple[str, int]]:
        """(task, data seed) of the next meta-batch's episodes. Advances the sampler."""
        B = self.meta_batch_size
        names = (
            self.rng.sample(self.task_names, B)
            if B <= len(self.task_names)
            else [self.rng.choice(self.task_names) for _ in range(B)]
        )
        return [(t, self.rng.choice(self.data_seeds)) for t in names]

    def state_dict(self) -> dict:
        """``{"task_rng": [version, internal state, gauss]}``, JSON-serialisable."""
        version, internal, gauss = self.rng.getstate()
        return {"task_rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            KeyError, TypeError, ValueError: not such a state (the sampler is unchanged).
        """
        rng = random.Random()
        version, internal, gauss = state["task_rng"]
        rng.setstate((version, tuple(internal), gauss))
        self.rng = rng
