"""Meta-training: sample meta-batches of tasks, run first-order ABMLL steps, save the prior.

Method doc, "Meta-objective". The loop is deliberately plain: episodes are tokenised once and
cached, each meta-step is :func:`abmll.meta.meta_step`, and every ``save_every`` steps and at
the end the run is saved into its output folder:

- the prior, as an adapter folder (:func:`abmll.checkpoint.save_adapter`) plus ``history.json``;
- the full trainer state in ``checkpoint/`` (:func:`abmll.checkpoint.save_trainer_state`): theta, the
  Adam state, the torch and task-sampler RNG states, the history, the validation curve, the
  best prior so far and the config. Resuming
  from it (:meth:`MetaTrainer.resume`) continues the run exactly as if it had not stopped
  (bit for bit on CPU).

The weight noise of task i of meta-step s is seeded from (seed, s, i)
(:func:`abmll.distributed.noise_seed`), so a run does not depend on how many processes share
its meta-batches: with an ``accelerator`` (several processes, see :mod:`abmll.distributed`)
each process runs its share of every meta-batch and only the main process writes.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from abmll.bayes_lora import BayesLoraModel, Params
from abmll.checkpoint import CheckpointError, save_adapter, write_json
from abmll.config import TaskArgs, config_fields
from abmll.data import check_tasks, load_episode, load_split
from abmll.distributed import (
    broadcast_params,
    check_in_sync,
    distributed_meta_step,
    fsdp_plugin,
    lockstep_counts,
    noise_seed,
    split_batches,
    task_share,
)
from abmll.episodes import EpisodeSampler, episode_batches
from abmll.gaussian_lora import HyperpriorConfig
from abmll.meta import MetaConfig, NonFiniteLossError, TaskBatches, meta_step
from abmll.roles import default as field_default
from abmll.roles import is_resumable
from abmll.scoring import ScoringConfig
from abmll.train_state import load_optimizer_tensors, load_trainer_state, save_trainer_state, set_rng_tensors

CHECKPOINT_DIR = "checkpoint"
"""Sub-folder of a run's output folder holding the trainer state."""

BEST_DIR = "best"
"""Sub-folder of a run's output folder holding the prior with the lowest validation NLL."""


@dataclass
class EpisodeCache:
    """Meta-training episodes, tokenised once and re-used across meta-steps: (task, data
    seed) -> :class:`abmll.meta.TaskBatches` with support = the k-shot train file and query =
    at most ``tasks.max_query`` examples of the dev file, on the model's device."""

    model: BayesLoraModel
    tokenizer: object
    tasks: TaskArgs
    scoring: ScoringConfig

    def __post_init__(self) -> None:
        self._store: dict[tuple, TaskBatches] = {}

    def get(self, task: str, seed: int) -> TaskBatches:
        """The episode of ``task`` and data ``seed``, in the scorer's own batches."""
        if (task, seed) not in self._store:
            self._store[(task, seed)] = episode_batches(
                self.model, self.tokenizer, task, seed, self.tasks, self.scoring, "dev", self.tasks.max_query
            )
        return self._store[(task, seed)]

    def resplit(self, task: str, seed: int, n_support: int, n_query: int) -> TaskBatches:
        """The episode split into exactly ``n_support`` / ``n_query`` batches (FSDP lockstep:
        every process runs as many forwards; :func:`abmll.distributed.split_batches`)."""
        key = (task, seed, n_support, n_query)
        if key not in self._store:
            ep = load_episode(task, self.tasks.k, seed, "dev", self.tasks.max_query, self.tasks.data_dir)
            device = next(self.model.parameters()).device
            split = lambda examples, n: [b.to(device) for b in split_batches(self.tokenizer, examples, self.scoring, n)]  # noqa: E731
            self._store[key] = TaskBatches(task, split(ep.support, n_support), split(ep.query, n_query))
        return self._store[key]


@dataclass
class ValidationCurve:
    """Meta-validation during a run: one record ``{"step": meta-steps done, **metrics}`` per
    validation, and the prior with the lowest finite validation NLL so far.

    Attributes:
        records: the curve, in step order.
        best: (NLL, detached copy of theta) of the best validated prior, or None.
    """

    records: list[dict] = field(default_factory=list)
    best: tuple[float, Params] | None = None

    def maybe_validate(self, validator, every: int, step: int, theta: Params, last: bool = False) -> None:
        """Validate ``theta`` by ``validator(theta)`` (metrics with at least ``nll``) when it is
        set, ``step`` was not validated yet, and ``every`` divides it or the run is at its
        ``last`` step; keep the prior if its NLL is finite and the lowest so far. A validation
        that fails (diverged adaptation, non-finite probabilities) is recorded with NLL inf and
        its error; the run goes on."""
        if validator is None or not every or (step % every and not last) or any(v["step"] == step for v in self.records):
            return
        try:
            with torch.random.fork_rng(devices=[]):  # validation's own seeding must not move the run's RNG
                metrics = validator(theta)
        except (NonFiniteLossError, ValueError) as err:
            metrics = {"nll": math.inf, "error": str(err)}
        self.records.append({"step": step, **metrics})
        if math.isfinite(metrics["nll"]) and (self.best is None or metrics["nll"] < self.best[0]):
            self.best = (metrics["nll"], {k: v.detach().clone() for k, v in theta.items()})

    def selection(self) -> dict:
        """How the best prior was chosen, for its saved config (call only when ``best`` is set)."""
        nll = self.best[0]
        step = next(v["step"] for v in self.records if v["nll"] == nll)
        return {"meta_steps_done": step, "validation_nll": nll, "selected_by": "lowest validation NLL"}

    def restore(self, records: list[dict], best: Params) -> None:
        """Take a saved curve and best prior (empty dict: none) back (see :meth:`MetaTrainer.resume`)."""
        finite = [v["nll"] for v in records if math.isfinite(v["nll"])]
        self.records, self.best = records, (min(finite), best) if best and finite else None


@dataclass
class MetaTrainer:
    """State of one meta-training run: theta, its Adam optimiser, the task sampler, the log.

    Attributes:
        accelerator: an ``accelerate.Accelerator`` of several processes
            (:func:`abmll.distributed.make_accelerator`), or None for one process. Every
            process samples the same meta-batches and runs its share of their tasks; only the
            main process saves. Under an FSDP config (the base model sharded with
            :func:`abmll.distributed.shard_base_model`) the processes run in lockstep: the
            meta-batch size must be a multiple of the number of processes.
        log_support_after: also log each meta-step's support NLL after the inner loop (one
            extra forward per task; see :func:`abmll.meta.meta_step`).
        theta: prior adapter tensors (leaf tensors, float32), trained in place.
        validator: called as ``validator(theta)`` -> metrics dict with at least ``nll`` (e.g.
            :class:`abmll.validation.Validator`), before the first meta-step and every
            ``validate_every`` steps; the prior with the lowest ``nll`` so far is saved in
            ``<out>/best/`` and the curve in ``<out>/validation.json``.
        validate_every: meta-steps between two validations (0: no validation).
        history: one dict of logs per finished meta-step (see :func:`abmll.meta.meta_step`);
            a skipped step's dict has ``skipped: True`` and ``error`` instead of the losses.
    """

    model: BayesLoraModel
    tokenizer: object
    task_names: list[str]
    tasks: TaskArgs
    meta: MetaConfig
    hyper: HyperpriorConfig
    scoring: ScoringConfig
    accelerator: Any = None
    log_support_after: bool = False
    validator: Callable[[Params], dict] | None = None
    validate_every: int = 0

    def __post_init__(self) -> None:
        if not self.task_names:
            raise ValueError("meta-training needs at least one task")
        acc = self.accelerator
        self.rank, self.world_size = (0, 1) if acc is None else (acc.process_index, acc.num_processes)
        self.lockstep = self.world_size > 1 and fsdp_plugin(acc) is not None
        if self.lockstep and self.meta.meta_batch_size % self.world_size:
            raise ValueError(
                f"with FSDP the meta-batch size ({self.meta.meta_batch_size}) must be a multiple of "
                f"the number of processes ({self.world_size})"
            )
        torch.manual_seed(self.meta.seed)
        self.sampler = EpisodeSampler(self.task_names, self.tasks.data_seeds, self.meta.meta_batch_size, self.meta.seed)
        self.theta: Params = {k: v.clone().requires_grad_() for k, v in self.model.init_params().items()}
        self.optimizer = torch.optim.Adam(self.theta.values(), lr=self.meta.outer_lr)
        self.history: list[dict] = []
        self.curve = ValidationCurve()
        self.episodes = EpisodeCache(self.model, self.tokenizer, self.tasks, self.scoring)
        self._saved_step: int | None = None
        if self.world_size > 1:
            broadcast_params(acc, self.theta)  # one starting point, whatever each process drew

    @property
    def validation(self) -> list[dict]:
        """The validation curve: one dict per validation, ``{"step": meta-steps done, **metrics}``."""
        return self.curve.records

    @property
    def is_main(self) -> bool:
        """True in the process that saves and reports (process 0; always, for one process)."""
        return self.rank == 0

    def sample_episodes(self) -> list[tuple[str, int]]:
        """(task, data seed) of the next meta-batch's episodes (:meth:`EpisodeSampler.sample`)."""
        return self.sampler.sample()

    def _local_batch(self, episodes: list[tuple[str, int]], step: int) -> list[TaskBatches]:
        """This process's share of the meta-batch ``episodes``, each task with its noise seed."""
        mine = task_share(len(episodes), self.rank, self.world_size)
        batch = [self.episodes.get(*episodes[i]) for i in mine]
        if self.lockstep:
            n_s, n_q = lockstep_counts(self.accelerator, [(len(t.support), len(t.query)) for t in batch])
            batch = [
                t if (len(t.support), len(t.query)) == (n_s, n_q) else self.episodes.resplit(*episodes[i], n_s, n_q)
                for i, t in zip(mine, batch)
            ]
        return [replace(t, noise_seed=noise_seed(self.meta.seed, step, i)) for i, t in zip(mine, batch)]

    @property
    def skipped_steps(self) -> int:
        """Number of meta-steps skipped for a non-finite loss or gradient."""
        return sum(1 for logs in self.history if logs.get("skipped"))

    def step(self, skip_nonfinite: bool = False) -> dict:
        """One meta-step; appends and returns its logs (with ``step`` and ``tasks``).

        Raises:
            NonFiniteLossError: the loss or a gradient is NaN/inf; the message names the step
                and the meta-batch's tasks, theta and the optimizer are unchanged. With
                ``skip_nonfinite`` the step is instead logged as skipped (``skipped``,
                ``error``), with a warning, and counts as done.
        """
        step = len(self.history)
        episodes = self.sample_episodes()
        names = [task for task, _ in episodes]
        batch = self._local_batch(episodes, step)
        device = next(iter(self.theta.values())).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                run = (self.model, self.theta, self.optimizer, batch)
                after = {"log_support_after": self.log_support_after}
                if self.world_size == 1:
                    logs = meta_step(*run, self.meta, self.hyper, step, **after)
                else:
                    logs = distributed_meta_step(self.accelerator, *run, len(episodes), self.meta, self.hyper, step, **after)
        except NonFiniteLossError as err:
            if not skip_nonfinite:
                raise NonFiniteLossError(f"{err} (meta-batch tasks {names})") from err
            if self.is_main:
                warnings.warn(f"skipping meta-step {step} (tasks {names}): {err}", RuntimeWarning, stacklevel=2)
            logs = {"skipped": True, "error": str(err)}
        logs = {"step": step, **logs, "tasks": names}
        self.history.append(logs)
        return logs

    def save(self, folder: str | Path, config: dict) -> Path:
        """Write the run into ``folder``: the trainer state into ``folder/checkpoint``
        (:func:`abmll.checkpoint.save_trainer_state`; see :meth:`resume`), then the prior
        (adapter folder with ``config``), ``history.json`` and ``best/``."""
        folder = Path(folder)
        best = None if self.curve.best is None else self.curve.best[1]
        state = {"history": self.history, **self.sampler.state_dict(), "validation": self.validation, "config": config}
        save_trainer_state(folder / CHECKPOINT_DIR, self.theta, self.optimizer, best, state)
        rho0 = {L.name: L.rho0 for L in self.model.layers}  # softplus^-1(c * std(W0)) per layer, for the record
        record = {**config, "kind": "prior", "rho0": rho0, "run_meta_steps_done": len(self.history)}
        save_adapter(
            folder, self.theta, {**record, "meta_steps_done": len(self.history), "meta_steps_skipped": self.skipped_steps}
        )
        write_json(folder / "history.json", self.history)
        if self.validation:
            write_json(folder / "validation.json", self.validation)
        if best is not None:
            save_adapter(folder / BEST_DIR, best, {**record, **self.curve.selection()})
        self._saved_step = len(self.history)
        return folder

    def resume(self, out_dir: str | Path, config: dict | None = None) -> int:
        """Restore the state saved by :meth:`save` in ``out_dir`` (theta, Adam state, torch and
        task-sampler RNG states, history, validation and best prior), so that :meth:`run`
        continues the saved run exactly. Returns the number of meta-steps already done.

        The newest state is used, or, when it is damaged (a file missing, truncated or not the
        bytes written), the previous one kept beside it, with a RuntimeWarning naming the
        damaged file and the step resumed from (:func:`abmll.checkpoint.load_latest_state`).

        Args:
            config: when given, must equal the saved run's config except for the entries in
                the resumable fields (e.g. ``meta.meta_steps`` may grow).
        Raises:
            CheckpointError: no valid state in ``out_dir/checkpoint`` (missing, or the newest
                and the previous one both damaged: not safetensors/JSON, truncated, tampered,
                not the bytes written, inconsistent), a different config, or adapter tensors
                that do not match this model's; the message names the file(s).
        """
        folder = Path(out_dir) / CHECKPOINT_DIR
        shapes = {k: tuple(v.shape) for k, v in self.theta.items()}
        changes = None if config is None else (lambda saved: config_changes(saved, config))
        tensors, state, where = load_trainer_state(folder, shapes, changes)
        sampler = replace(self.sampler)
        try:  # all that can still fail, before any change (the optimizer loads last)
            sampler.load_state_dict(state)
            load_optimizer_tensors(self.optimizer, list(self.theta), tensors, state["adam_param_groups"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{where}: incomplete or invalid trainer state ({err!r})") from err
        best = {k: tensors[f"best/{k}"].to(v.device) for k, v in self.theta.items() if f"best/{k}" in tensors}
        set_rng_tensors(tensors, next(iter(self.theta.values())).device)  # nothing below can fail
        with torch.no_grad():
            for k, v in self.theta.items():
                v.copy_(tensors[f"theta/{k}"])
        self.sampler, self.history = sampler, state["history"]
        self.curve.restore(state["validation"], best)
        self._saved_step = len(self.history)
        return len(self.history)

    def run(
        self,
        out_dir: str | Path | None,
        config: dict,
        save_every: int = 0,
        on_step: Callable[[dict], None] | None = None,
        skip_nonfinite: bool = False,
    ) -> Params:
        """Run meta-steps until ``meta.meta_steps`` are done (continuing after :meth:`resume`),
        saving to ``out_dir`` (see :meth:`save`) every ``save_every`` steps (0: only at the end)
        and calling ``on_step(logs)`` after each. Returns theta (detached). With several
        processes only the main one saves, and all return once the last save is written.

        A first Ctrl-C (SIGINT) lets the meta-step under way finish, saves it and then raises
        KeyboardInterrupt, so an interrupted run loses nothing it finished (``--resume``
        continues it); a second one stops at once.

        Raises:
            NonFiniteLossError: a non-finite loss or gradient (unless ``skip_nonfinite``, see
                :meth:`step`); the message names the step, the tasks and the last good
                checkpoint, which is left as it was.
            KeyboardInterrupt: after an interrupt, once the finished step is saved.
        """
        validate = partial(self.curve.maybe_validate, self.validator, self.validate_every)
        validate(len(self.history), self.theta)
        with finish_step_on_interrupt() as interrupted:
            while len(self.history) < self.meta.meta_steps:
                try:
                    logs = self.step(skip_nonfinite)
                except NonFiniteLossError as err:
                    kept = (
                        f"the last good checkpoint (step {self._saved_step}) is kept in {out_dir}"
                        if out_dir and self._saved_step is not None
                        else "no checkpoint was written"
                    )
                    raise NonFiniteLossError(f"{err}; {kept}") from err
                if on_step:
                    on_step(logs)
                validate(len(self.history), self.theta, last=len(self.history) == self.meta.meta_steps)
                if out_dir and (interrupted.is_set() or save_every and len(self.history) % save_every == 0):
                    self._save_on_main(out_dir, config)
                if interrupted.is_set():
                    raise KeyboardInterrupt
        if out_dir and self._saved_step != len(self.history):
            self._save_on_main(out_dir, config)
        if self.world_size > 1:
            check_in_sync(self.accelerator, self.theta)  # every process ends with the same prior
            self.accelerator.wait_for_everyone()
        return {k: v.detach() for k, v in self.theta.items()}

    @property
    def best_prior(self) -> Params | None:
        """The validated prior with the lowest validation NLL (detached), or None without validation."""
        return None if self.curve.best is None else {k: v.detach() for k, v in self.curve.best[1].items()}

    def _save_on_main(self, out_dir: str | Path, config: dict) -> None:
        if self.is_main:
            self.save(out_dir, config)
        self._saved_step = len(self.history)


@contextmanager
def finish_step_on_interrupt() -> Iterator[threading.Event]:
    """While open, a first SIGINT only sets the yielded event (the caller finishes its unit of
    work, saves it, and stops) and says so on stderr; a second raises KeyboardInterrupt at
    once. Off the main thread (where signals cannot be handled) the event is never set and
    SIGINT acts as usual."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def handler(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        print("\ninterrupt: finishing this meta-step, then saving it (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def config_changes(saved: dict, current: dict) -> list[str]:
    """``"group.key: saved -> current"`` for each config entry that differs between two
    :meth:`abmll.config.RunConfig.to_dict` dicts, except the resumable and machine fields
    (:func:`abmll.roles.is_resumable`, e.g. ``meta.meta_steps`` may grow), compared as JSON.
    A field the saved config lacks (added to abmll after it was saved) counts as its default."""
    old, new = _entries(saved), _entries(json.loads(json.dumps(current)))
    for name in new.keys() - old.keys():
        default = _field_default(name)
        if default is not _MISSING:
            old[name] = default
    return [
        f"{name}: {old.get(name)!r} -> {new.get(name)!r}"
        for name in sorted(old.keys() | new.keys())
        if not _resumable(name) and old.get(name) != new.get(name)
    ]


_MISSING = object()


def _resumable(name: str) -> bool:
    """Whether config entry ``group.key`` may change on resume."""
    f = config_fields().get(name)
    return f is not None and is_resumable(f)


def _field_default(name: str):
    """The JSON form of the dataclass default of config entry ``group.key``, or _MISSING."""
    f = config_fields().get(name)
    if f is None or (f.default is MISSING and f.default_factory is MISSING):
        return _MISSING
    return json.loads(json.dumps(field_default(f)))


def _entries(config: dict) -> dict:
    """``{"group.key": value}`` (``{"key": value}`` for entries that are not groups)."""
    return {
        group if key is None else f"{group}.{key}": value
        for group, sub in config.items()
        for key, value in (sub.items() if isinstance(sub, dict) else [(None, sub)])
    }


def task_names(tasks: TaskArgs, split_part: str) -> list[str]:
    """The explicit ``tasks.train_tasks`` / ``tasks.test_tasks`` list for ``split_part``
    "train" / "test", else that part of the split, checked for presence (see
    :func:`abmll.data.check_tasks`)."""
    explicit = tasks.train_tasks if split_part == "train" else tasks.test_tasks
    names: Sequence[str] = explicit or load_split(tasks.split, tasks.data_dir)[split_part]
    return check_tasks(names, tasks.data_dir, skip_missing=tasks.skip_missing)
