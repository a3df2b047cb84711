"""``abmll meta-train``: meta-train a prior (and ``demo``'s first half)."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from abmll.args import ReportArgs, RunArgs, TrainArgs
from abmll.bayes_lora import BayesLoraModel
from abmll.config import EvalArgs, RunConfig
from abmll.data import check_task_files, check_tasks
from abmll.distributed import base_model_device, make_accelerator, prepare_model
from abmll.loading import build_model
from abmll.outputs import (
    check_writable,
    guard_run_folder,
)
from abmll.plots import CURVES, VALIDATION_CURVE, plot_training_curves, plot_validation_curve
from abmll.train import BEST_DIR, MetaTrainer, task_names
from abmll.validation import make_validator


def summary_writer(report: ReportArgs | None):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``report.tensorboard``, or None.

    Raises:
        ValueError: --tensorboard is given but tensorboard is not installed.
    """
    if report is None or not report.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {err}") from None
    return SummaryWriter(log_dir=report.tensorboard)


class report_writer:
    """Context manager: the SummaryWriter of ``report`` (or None), flushed and closed on exit."""

    def __init__(self, report: ReportArgs) -> None:
        self.writer = summary_writer(report)

    def __enter__(self):
        return self.writer

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def meta_train(
    run: RunArgs, train: TrainArgs, cfg: RunConfig, report: ReportArgs | None = None, writer=None
) -> tuple[BayesLoraModel, object, dict]:
    """Meta-train and save the prior into ``run.out`` (saving, resuming and validating as
    ``train`` says; with training_curves.png unless
    ``report.plots`` is False; scalars to ``writer``, a SummaryWriter, when given);
    returns (model, tokenizer, theta). Under ``accelerate launch`` with several processes
    (see abmll.distributed) the tasks of each meta-batch are split across the processes and
    only the main one prints, plots and writes."""
    tasks = cfg.tasks
    names = [t for t in task_names(tasks, "train") if t not in tasks.val_tasks]
    if train.validate_every and not tasks.val_tasks:
        raise ValueError("--validate_every needs --val_tasks (train tasks held out of meta-training)")
    guard_run_folder(run.out, train.resume, run.overwrite)
    check_writable(run.out)
    check_task_files(names, ("train", "dev"), tasks.k, tasks.data_seeds, tasks.data_dir)
    if train.validate_every:
        check_task_files(
            check_tasks(tasks.val_tasks, tasks.data_dir), ("train", "dev"), tasks.k, tasks.data_seeds, tasks.data_dir
        )
    accelerator = make_accelerator(cfg.model.device)  # None for a single process
    model, tokenizer = build_model(cfg, base_model_device(accelerator, cfg.model.device))
    prepare_model(accelerator, model)  # FSDP config: shard the base model
    validator = None
    if train.validate_every:
        validator = make_validator(
            model,
            tokenizer,
            check_tasks(tasks.val_tasks, tasks.data_dir),
            tasks.data_seeds,
            tasks,
            cfg.scoring,
            cfg.meta,
            cfg.eval or EvalArgs(),
        )
    trainer = MetaTrainer(
        model,
        tokenizer,
        names,
        cfg.tasks,
        cfg.meta,
        cfg.hyperprior,
        cfg.scoring,
        accelerator=accelerator,
        log_support_after=report is not None and report.log_support_after,
        validator=validator,
        validate_every=train.validate_every,
    )
    is_main = trainer.is_main
    say = print if is_main else (lambda *args: None)
    writer = writer if is_main else None
    say(
        f"meta-training on {len(names)} tasks: {', '.join(names)}"
        + (f" ({trainer.world_size} processes)" if trainer.world_size > 1 else "")
    )
    if train.resume:
        done = trainer.resume(run.out, cfg.to_dict())
        say(f"resuming {run.out} after {done} meta-steps")
    bar = tqdm(total=cfg.meta.meta_steps, initial=len(trainer.history), desc="meta-train", unit="step", disable=not is_main)

    def on_step(logs):
        bar.update(1)
        if writer is not None:
            for key in ("query_nll", "kl", "hyperprior", "support_nll_before", "support_nll_after", "loss"):
                if isinstance(logs.get(key), (int, float)):
                    writer.add_scalar(f"meta_train/{key}", logs[key], logs["step"])
        if not logs.get("skipped"):
            after = f"->{logs['support_nll_after']:.3f}" if "support_nll_after" in logs else ""
            bar.set_postfix(
                q_nll=f"{logs['query_nll']:.3f}", kl=f"{logs['kl']:.3g}", s_nll=f"{logs['support_nll_before']:.3f}{after}"
            )

    theta = trainer.run(run.out, cfg.to_dict(), train.save_every, on_step, train.skip_nonfinite)
    bar.close()
    say(f"prior saved to {run.out}")
    if is_main and (report is None or report.plots) and any("query_nll" in h for h in trainer.history):
        print(f"training curves: {plot_training_curves(trainer.history, Path(run.out) / CURVES)}")
    if is_main and trainer.validation:
        best = min(trainer.validation, key=lambda v: v["nll"])
        say(
            f"validation NLL: untrained {trainer.validation[0]['nll']:.3f}, best {best['nll']:.3f} at meta-step "
            f"{best['step']} (saved to {Path(run.out) / BEST_DIR})"
        )
        if report is None or report.plots:
            print(f"validation curve: {plot_validation_curve(trainer.validation, Path(run.out) / VALIDATION_CURVE)}")
    return model, tokenizer, theta
