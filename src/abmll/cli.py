"""The ``abmll`` command: thin wrappers that parse dataclass configs and call the library.

    abmll --version
    abmll meta-train [--config run.yaml] [--flag value ...] --out DIR
    abmll evaluate   --prior DIR [--flag value ...] [--out DIR]
    abmll demo       [--out DIR]        (meta-train + evaluate with src/abmll/demo.yaml)
    abmll adapt      --prior DIR --support FILE.jsonl --out DIR      (a task posterior, PEFT format)
    abmll predict    --adapter DIR --input FILE.jsonl [--out DIR] [--eval_samples N]
    abmll export     --adapter DIR --out DIR                         (abmll prior -> PEFT LoRA folder)
    abmll data       --task NAME (--dataset NAME | --data_files train=F test=F) --out DATA_DIR ...

Each command takes the fields of the config groups it uses as flags (``--inner_steps 3`` or
``--inner-steps 3``);
``--config FILE.yaml`` sets defaults that flags override (flat keys or grouped by section);
every command accepts the same file and ignores the sections it does not use. Commands that
read an adapter (evaluate, adapt, predict, export) start from the config saved with it, which
the file and the flags override. The resolved config is saved beside every checkpoint and
result. ``--tensorboard DIR`` (meta-train, evaluate, demo) logs scalars when tensorboard is
installed; ``--plots false`` turns off the PNG plots.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import yaml
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from abmll.__main__ import COMMANDS
from abmll.bayes_lora import AUTO_TARGETS, BayesLoraModel
from abmll.checkpoint import CONFIG, STATE, CheckpointError, write_json
from abmll.checks import at_least, non_empty, one_of
from abmll.config import CONFIG_GROUPS, MACHINE_FIELDS, EvalArgs, TaskArgs, from_dict, to_dict
from abmll.convert import ColumnMapping, convert_dataset, load_hf_dataset, read_jsonl_rows
from abmll.data import DataError, Example, check_task_files, check_tasks, read_jsonl
from abmll.distributed import base_model_device, make_accelerator, prepare_model
from abmll.evaluate import Method, evaluate
from abmll.export import export_peft, load_adapter_folder
from abmll.meta import NonFiniteLossError, adapt, mean_nll, predict_samples
from abmll.metrics import ECE_SCHEME, compute_metrics
from abmll.models import load_base_model, resolve_device
from abmll.outputs import (
    ResultLog,
    check_writable,
    file_digest,
    guard_adapter_folder,
    guard_run_folder,
    settings_hash,
)
from abmll.plots import (
    CURVES,
    VALIDATION_CURVE,
    plot_reliability_per_method,
    plot_training_curves,
    plot_validation_curve,
)
from abmll.priors import prior_status, resolve_adapter, warn_if_unfinished
from abmll.scoring import make_batches
from abmll.train import BEST_DIR, CHECKPOINT_DIR, MetaTrainer, task_names
from abmll.uncertainty import UNCERTAINTY_KINDS, decompose
from abmll.validation import make_validator

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


@dataclass
class RunArgs:
    """Command-level options.

    Attributes:
        config: YAML file of defaults (flags override it).
        out: output folder (prior, results, logs).
        prior: a prior folder written by ``abmll meta-train`` (evaluate).
        save_every: write the prior and the trainer state every N meta-steps (0: only at the end).
        resume: continue the run saved in ``out`` (its ``checkpoint/``) exactly where it stopped.
        skip_nonfinite: skip a meta-batch whose loss or gradient is NaN/inf (logged in the
            history) instead of stopping with an error.
        validate_every: meta-train: score the prior on ``--val_tasks`` before the first
            meta-step and every N meta-steps (adapt ``--test_steps`` on the train file, predict
            the dev file with ``--eval_samples``); the curve goes to validation.json and
            validation_curve.png, the prior with the lowest validation NLL to ``<out>/best/``.
            0: no validation.
        overwrite: replace what ``out`` already holds (a run, results, predictions, an
            adapter) instead of refusing; without it a finished output is never replaced and
            partial results of the same settings are resumed.
    """

    config: str | None = None
    out: str = "runs/abmll"
    prior: str | None = None
    save_every: int = 10
    resume: bool = False
    skip_nonfinite: bool = False
    validate_every: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        at_least(self, ("save_every", "validate_every"), 0)


@dataclass
class ReportArgs:
    """Progress reporting of meta-train, evaluate and demo.

    Attributes:
        tensorboard: also log scalars (losses per meta-step, evaluation metrics) to this
            TensorBoard log folder; needs the ``tensorboard`` package.
        plots: write PNG plots beside the outputs (training_curves.png, reliability_<method>.png).
        log_support_after: meta-train also logs the support NLL after each task's inner loop
            (one extra forward of the support set per task and meta-step, about 6% of a
            meta-step at k=16).
    """

    tensorboard: str | None = None
    plots: bool = True
    log_support_after: bool = False


@dataclass
class AdaptArgs:
    """``abmll adapt``: the prior is ``--prior``, the posterior goes to ``--out`` (PEFT format).

    Attributes:
        support: JSON-lines file of labelled examples (the data format of ``abmll.data``).
    """

    support: str | None = None


@dataclass
class PredictArgs:
    """``abmll predict``: predictions for every line of ``input``, into ``--out``/predictions.jsonl
    (written as they are made; rerunning the same command after an interrupt resumes).

    Attributes:
        adapter: a posterior from ``abmll adapt`` or a prior (any abmll adapter folder).
        input: JSON-lines file of examples; ``output`` may be left out (no label).
        sample_seed: seeds the weight samples (with ``--eval_samples`` > 0).
        chunk_size: examples per progress step.
        abstain_above: mark an example ``"abstain": true`` when its uncertainty (``abstain_on``,
            nats) exceeds this value (selective prediction); None: never.
        abstain_on: the uncertainty ``abstain_above`` applies to: "total" (predictive entropy)
            or "epistemic" (mutual information between the answer and the weights).
    """

    adapter: str | None = None
    input: str | None = None
    sample_seed: int = 0
    chunk_size: int = 8
    abstain_above: float | None = None
    abstain_on: Literal["total", "epistemic"] = "total"

    def __post_init__(self) -> None:
        at_least(self, ("chunk_size",), 1)
        one_of(self, "abstain_on", UNCERTAINTY_KINDS)
        if self.abstain_above is not None:
            at_least(self, ("abstain_above",), 0)


@dataclass
class ExportArgs:
    """``abmll export``: an abmll adapter folder as a PEFT LoRA folder (+ scale sidecar) in ``--out``.

    Attributes:
        adapter: the abmll adapter folder (e.g. a prior written by meta-train).
        base_model_name_or_path: recorded in adapter_config.json (default: the base model's path or id).
    """

    adapter: str | None = None
    base_model_name_or_path: str | None = None


@dataclass
class DataArgs(ColumnMapping):
    """``abmll data``: convert a dataset into the MetaICL k-shot layout under ``--out``.
    Its column-mapping fields (input_columns, input_template, input_separator,
    output_column, options, options_column, label_names, task_type) are those of
    :class:`abmll.convert.ColumnMapping`, documented there.

    Attributes:
        task: task name (folder and file prefix).
        dataset: a Hugging Face dataset id, loading script or ``save_to_disk`` folder
            (needs the ``datasets`` package); or a builder such as json / csv with ``data_files``.
        dataset_config: the dataset's configuration name (e.g. "sst2" of "glue").
        data_files: ``split=path`` pairs; without ``--dataset`` these are read as local
            JSON-lines files, with no extra package.
        train_split: split the k-shot train / dev files are sampled from.
        test_split: split written as the test file (default: test, else validation).
        shots: the k values.
        data_seeds: the sampling seeds (MetaICL's by default).
        test_rows: at most this many test rows (default: all).
    """

    task: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    data_files: list[str] = field(default_factory=list)
    train_split: str = "train"
    test_split: str | None = None
    shots: list[int] = field(default_factory=lambda: [16, 8])
    data_seeds: list[int] = field(default_factory=lambda: [100, 13, 21, 42, 87])
    test_rows: int | None = None

    def __post_init__(self) -> None:
        non_empty(self, ("shots", "data_seeds"))
        if min(self.shots) < 1:
            raise ValueError(f"--shots must all be >= 1, got {self.shots}")


COMMAND_ARGS = (ReportArgs, AdaptArgs, PredictArgs, ExportArgs, DataArgs)


def _parse(argv: list[str], groups: list[str]):
    run, cfg, _ = _parse_with(argv, groups)
    return run, cfg


def _parse_with(argv: list[str], groups: list[str], extra: tuple = (), adapter_flag: str | None = None):
    """Parse ``argv`` into (RunArgs, {group: config}, [extra dataclasses]).

    Defaults, lowest first: the dataclasses' (``target_modules`` is "auto": the architecture's
    preset), the config saved in the adapter folder named by ``--<adapter_flag>`` (except its
    tasks group), the ``--config`` YAML file, then the flags.
    """
    classes = [RunArgs, *extra] + [CONFIG_GROUPS[g] for g in groups]
    parser = HfArgumentParser(classes)
    if "lora" in groups:
        parser.set_defaults(target_modules=[AUTO_TARGETS])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    if adapter_flag:
        pre.add_argument(f"--{adapter_flag}")
    known, _ = pre.parse_known_args(argv)
    file_defaults = {}
    if known.config:
        try:
            raw = yaml.safe_load(Path(known.config).read_text(encoding="utf-8-sig")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SystemExit(f"config: cannot read {known.config} ({err})") from None
        file_defaults = _flatten(raw, classes)
    folder = getattr(known, adapter_flag, None) if adapter_flag else None
    folder = folder or file_defaults.get(adapter_flag)
    if folder:
        parser.set_defaults(**_saved_defaults(str(resolve_adapter(folder)), groups))
    parser.set_defaults(**file_defaults)
    run, *rest = parser.parse_args_into_dataclasses(argv)
    for parsed in (run, *rest[:len(extra)]):            # a shipped prior's short name -> its folder
        if adapter_flag and getattr(parsed, adapter_flag, None):
            setattr(parsed, adapter_flag, str(resolve_adapter(getattr(parsed, adapter_flag))))
    return run, dict(zip(groups, rest[len(extra):])), rest[:len(extra)]


def _saved_defaults(folder: str, groups: list[str]) -> dict:
    """Flat flag defaults from ``folder/abmll_config.json`` (groups in ``groups`` but tasks)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {folder} an abmll adapter folder?)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    flat = {}
    for group in groups:
        if group == "tasks" or not isinstance(saved.get(group), dict):
            continue
        try:
            checked = asdict(from_dict(saved, group, str(path)))    # refuses an invalid value, naming the field
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        flat.update({k: v for k, v in checked.items() if k in saved[group] and k not in MACHINE_FIELDS.get(group, ())})
    return flat


def _flatten(raw: dict, classes) -> dict:
    """YAML -> flat flag defaults for this command's ``classes``; accepts
    ``{section: {field: value}}`` or flat keys. Keys of other commands' options and config
    groups are ignored (one file serves every command); unknown keys are an error."""
    names = {f.name for c in classes for f in fields(c)}
    anywhere = names | {f.name for c in [RunArgs, *COMMAND_ARGS, *CONFIG_GROUPS.values()] for f in fields(c)}
    flat = {}
    for key, value in raw.items():
        section = isinstance(value, dict) and key in CONFIG_GROUPS
        items = value.items() if section else [(key, value)]
        used = not section or CONFIG_GROUPS[key] in classes     # a section of a group this command lacks: skipped
        for k, v in items:
            if k not in (_fields_of(CONFIG_GROUPS[key]) if section else anywhere):
                raise SystemExit(f"config: unknown key {k!r}" + (f" in section {key!r}" if section else ""))
            if used and k in names:
                flat[k] = v
    return flat


def _fields_of(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _build(cfg: dict, device=None):
    m = cfg["model"]
    base, tokenizer = load_base_model(m.model, m.dtype, resolve_device(m.device if device is None else device))
    model = BayesLoraModel(base, cfg["lora"])
    cfg["lora"] = model.config          # target_modules resolved ("auto" -> the preset)
    return model, tokenizer


def _summary_writer(report: ReportArgs | None):
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


TRAIN_GROUPS = ["model", "lora", "hyperprior", "scoring", "meta", "tasks"]
ALL_GROUPS = TRAIN_GROUPS + ["eval"]


def meta_train(run: RunArgs, cfg: dict, report: ReportArgs | None = None, writer=None
               ) -> tuple[BayesLoraModel, object, dict]:
    """Meta-train and save the prior into ``run.out`` (with training_curves.png unless
    ``report.plots`` is False; scalars to ``writer``, a SummaryWriter, when given);
    returns (model, tokenizer, theta). Under ``accelerate launch`` with several processes
    (see abmll.distributed) the tasks of each meta-batch are split across the processes and
    only the main one prints, plots and writes."""
    tasks = cfg["tasks"]
    names = [t for t in task_names(tasks, "train") if t not in tasks.val_tasks]
    if run.validate_every and not tasks.val_tasks:
        raise ValueError("--validate_every needs --val_tasks (train tasks held out of meta-training)")
    guard_run_folder(run.out, run.resume, run.overwrite)
    check_writable(run.out)
    check_task_files(names, ("train", "dev"), tasks.k, tasks.data_seeds, tasks.data_dir)
    if run.validate_every:
        check_task_files(check_tasks(tasks.val_tasks, tasks.data_dir), ("train", "dev"), tasks.k, tasks.data_seeds,
                         tasks.data_dir)
    accelerator = make_accelerator(cfg["model"].device)       # None for a single process
    model, tokenizer = _build(cfg, base_model_device(accelerator, cfg["model"].device))
    prepare_model(accelerator, model)                          # FSDP config: shard the base model
    validator = None
    if run.validate_every:
        validator = make_validator(model, tokenizer, check_tasks(tasks.val_tasks, tasks.data_dir), tasks.data_seeds,
                                   tasks, cfg["scoring"], cfg["meta"], cfg.get("eval", EvalArgs()))
    trainer = MetaTrainer(model, tokenizer, names, cfg["tasks"], cfg["meta"], cfg["hyperprior"], cfg["scoring"],
                          accelerator=accelerator, log_support_after=report is not None and report.log_support_after,
                          validator=validator, validate_every=run.validate_every)
    is_main = trainer.is_main
    say = print if is_main else (lambda *args: None)
    writer = writer if is_main else None
    say(f"meta-training on {len(names)} tasks: {', '.join(names)}"
        + (f" ({trainer.world_size} processes)" if trainer.world_size > 1 else ""))
    if run.resume:
        done = trainer.resume(run.out, to_dict(**cfg))
        say(f"resuming {run.out} after {done} meta-steps")
    bar = tqdm(total=cfg["meta"].meta_steps, initial=len(trainer.history), desc="meta-train", unit="step",
               disable=not is_main)

    def on_step(logs):
        bar.update(1)
        if writer is not None:
            for key in ("query_nll", "kl", "hyperprior", "support_nll_before", "support_nll_after", "loss"):
                if isinstance(logs.get(key), (int, float)):
                    writer.add_scalar(f"meta_train/{key}", logs[key], logs["step"])
        if not logs.get("skipped"):
            after = f"->{logs['support_nll_after']:.3f}" if "support_nll_after" in logs else ""
            bar.set_postfix(q_nll=f"{logs['query_nll']:.3f}", kl=f"{logs['kl']:.3g}",
                            s_nll=f"{logs['support_nll_before']:.3f}{after}")

    theta = trainer.run(run.out, to_dict(**cfg), run.save_every, on_step, run.skip_nonfinite)
    bar.close()
    say(f"prior saved to {run.out}")
    if is_main and (report is None or report.plots) and any("query_nll" in h for h in trainer.history):
        print(f"training curves: {plot_training_curves(trainer.history, Path(run.out) / CURVES)}")
    if is_main and trainer.validation:
        best = min(trainer.validation, key=lambda v: v["nll"])
        say(f"validation NLL: untrained {trainer.validation[0]['nll']:.3f}, best {best['nll']:.3f} at meta-step "
            f"{best['step']} (saved to {Path(run.out) / BEST_DIR})")
        if report is None or report.plots:
            print(f"validation curve: {plot_validation_curve(trainer.validation, Path(run.out) / VALIDATION_CURVE)}")
    return model, tokenizer, theta


RESULTS, PARTIAL_RESULTS = "results.json", "results.partial.jsonl"


def check_evaluate_inputs(run: RunArgs, cfg: dict) -> list[str]:
    """What ``evaluate`` needs, checked before any model is loaded: every test task's files
    (support and test, every data seed), the output folder, and that ``results.json`` there
    is not replaced without ``--overwrite``. Returns the test task names.

    Raises:
        DataError: a task file problem (file and line). ValueError: ``--out`` unwritable or
            holding results.
    """
    tasks: TaskArgs = cfg["tasks"]
    names = task_names(tasks, "test")
    check_task_files(names, ("train", "test"), tasks.k, tasks.data_seeds, tasks.data_dir)
    check_writable(run.out)
    if (Path(run.out) / RESULTS).is_file() and not run.overwrite:
        raise ValueError(f"--out {run.out} already holds {RESULTS}; pass --overwrite to replace it or choose "
                         "another --out")
    return names


def run_evaluate(run: RunArgs, cfg: dict, model, tokenizer, theta, report: ReportArgs | None = None,
                 writer=None, prior: dict | None = None) -> dict:
    """Evaluate zero-shot and ABMLL on the split's test tasks; print and save the results
    (results.json with the resolved config, and one reliability diagram per method pooled
    over tasks and seeds unless ``report.plots`` is False). ``prior``: the prior's
    :func:`abmll.priors.prior_status`, recorded in the results.

    Each (method, task, seed) result is appended to ``results.partial.jsonl`` as it finishes;
    run again with the same settings, the command computes only the missing ones."""
    names = check_evaluate_inputs(run, cfg)
    tasks: TaskArgs = cfg["tasks"]
    ev: EvalArgs = cfg["eval"]
    methods = [Method("zero_shot", model.init_params(), 0, 0), Method("abmll", theta, ev.test_steps, ev.eval_samples)]
    for name in ev.compare_priors:
        methods.append(Method(f"prior:{Path(name).name}", _fitting_prior(name, model), ev.test_steps, ev.eval_samples))
    settings = settings_hash({"config": _result_config(cfg), "names": names,
                              "methods": {m.name: tensor_digest(m.prior) for m in methods}})
    log = ResultLog(Path(run.out) / PARTIAL_RESULTS, settings, overwrite=run.overwrite)
    done = {(e["method"], e["task"], e["seed"]): (e["metrics"], torch.tensor(e["probs"]), torch.tensor(e["labels"]))
            for e in log.entries}
    if done:
        print(f"resuming: {len(done)} result(s) read back from {log.path}")
    bar = tqdm(total=len(names) * len(tasks.data_seeds) * len(methods), desc="evaluate", unit="run")
    running = {m.name: [] for m in methods}

    def on_result(method, task, seed, metrics):
        running[method].append(metrics)
        bar.update(1)
        bar.set_postfix({f"{m} acc/nll": f"{sum(r['accuracy'] for r in rs) / len(rs):.3f}/"
                         f"{sum(r['nll'] for r in rs) / len(rs):.3f}" for m, rs in running.items() if rs})

    def on_predictions(method, task, seed, probs, labels):
        if (method, task, seed) not in done:
            log.append({"method": method, "task": task, "seed": seed, "metrics": running[method][-1],
                        "probs": probs.tolist(), "labels": labels.tolist()})

    results, predictions = evaluate_with_predictions(model, tokenizer, methods, names, tasks.data_seeds, tasks,
                                                     cfg["scoring"], cfg["meta"], ev, on_result, on_predictions,
                                                     done=done)
    bar.close()
    results["config"] = to_dict(**cfg)
    results["ece_scheme"] = ECE_SCHEME
    if prior is not None:
        results.update(prior=prior, prior_complete=prior["complete"])
    out = Path(run.out) / RESULTS
    write_json(out, results)
    log.remove()
    print(format_table(results))
    print(f"results saved to {out}")
    if report is None or report.plots:
        for method, path in plot_reliability_per_method(predictions, run.out).items():
            print(f"reliability diagram ({method}): {path}")
    if writer is not None:
        for method, res in results["methods"].items():
            for metric, value in res["mean"].items():
                writer.add_scalar(f"evaluate/{method}/{metric}", value, 0)
    return results


def _result_config(cfg: dict) -> dict:
    """The resolved config without machine fields (results do not depend on them)."""
    config = to_dict(**cfg)
    for group, names in MACHINE_FIELDS.items():
        for name in names:
            config.get(group, {}).pop(name, None)
    config.get("lora", {}).pop("frozen_cache_mb", None)
    return config


def tensor_digest(params: dict) -> str:
    """A short hash of adapter tensors (their names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for key in sorted(params):
        t = params[key].detach().to("cpu").contiguous()
        h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _fitting_prior(name: str, model: BayesLoraModel) -> dict:
    """The tensors of prior ``name`` (folder or shipped name), on the model's device.

    Raises:
        CheckpointError: unreadable, or tensors that do not fit ``model``'s adapters.
    """
    folder = resolve_adapter(name)
    tensors, _ = load_adapter_folder(folder)
    return _on_model(tensors, model, f"{folder}: its tensors do not fit this model's adapters",
                     "compare priors made with the same model, rank, target_modules and top_layers")


def _on_model(tensors: dict, model: BayesLoraModel, problem: str, hint: str) -> dict:
    """``tensors`` moved to ``model``'s device, after checking they match its adapters' shapes.

    Raises:
        CheckpointError: ``problem`` with an example of the mismatch and ``hint``.
    """
    expected = {k: tuple(v.shape) for k, v in model.init_params().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:2]
        raise CheckpointError(f"{problem} ({hint}; e.g. {diff})")
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in tensors.items()}


def evaluate_with_predictions(model, tokenizer, methods, task_names_, seeds, tasks, scoring, meta, ev,
                              on_result=None, on_predictions=None, done=None) -> tuple[dict, dict]:
    """:func:`abmll.evaluate.evaluate`, also keeping each run's predictions: returns (results,
    {method: [(probs (N, C), labels (N,)), ...]}) for the pooled reliability diagrams.
    Raises what ``evaluate`` raises."""
    predictions = {m.name: [] for m in methods}

    def keep(method, task, seed, probs, labels):
        predictions[method].append((probs, labels))
        if on_predictions is not None:
            on_predictions(method, task, seed, probs, labels)

    results = evaluate(model, tokenizer, methods, task_names_, seeds, tasks, scoring, meta, ev, on_result=on_result,
                       on_predictions=keep, done=done)
    return results, predictions


def format_table(results: dict) -> str:
    """Per task (mean over seeds): accuracy, macro-F1, ECE and NLL of every method, then the
    task mean. Macro-F1 beside accuracy shows collapse to the majority class (accuracy at the
    majority rate, macro-F1 near 1 / C)."""
    methods = list(results["methods"])
    head = f"{'task':28s}" + "".join(f" | {m + ' acc':>14s} {'F1':>5s} {'ECE':>5s} {'NLL':>5s}" for m in methods)
    lines = [head, "-" * len(head)]
    rows = [(t, {m: results["methods"][m]["per_task"][t]["mean"] for m in methods}) for t in results["tasks"]]
    rows.append(("mean over tasks", {m: results["methods"][m]["mean"] for m in methods}))
    for name, by_method in rows:
        lines.append(f"{name:28s}" + "".join(
            f" | {r['accuracy']:14.3f} {r['macro_f1']:5.3f} {r['ece']:5.3f} {r['nll']:5.3f}" for r in by_method.values()))
    return "\n".join(lines)


def _load_prior(folder: str, cfg: dict):
    """Build the model an adapter folder (abmll or exported PEFT layout) belongs to and load
    its tensors. Config groups missing from ``cfg`` are filled from the folder's saved config.
    Returns (model, tokenizer, tensors, status): ``status`` is the
    :func:`abmll.priors.prior_status` of a prior (warned about loudly when unfinished), else None.

    Raises:
        CheckpointError: unreadable folder, or tensors that do not fit the model the config builds.
    """
    theta, saved = load_adapter_folder(folder)
    status = prior_status(saved, folder)
    warn_if_unfinished(status)
    for group in TRAIN_GROUPS:
        if group != "tasks" and group not in cfg:
            try:
                cfg[group] = from_dict(saved, group, f"{folder}/{CONFIG}")
            except ValueError as err:
                raise CheckpointError(str(err)) from None
    model, tokenizer = _build(cfg)
    return model, tokenizer, _on_model(theta, model, f"{folder}: its adapter tensors do not fit the model built "
                                       "from the config", f"model {cfg['model'].model!r}, rank {cfg['lora'].rank}"), status


def _adapter_config(cfg: dict, model: BayesLoraModel, **extra) -> dict:
    return {**to_dict(**cfg), "rho0": {L.name: L.rho0 for L in model.layers}, **extra}


def run_adapt(run: RunArgs, args: AdaptArgs, cfg: dict) -> Path:
    """Adapt the prior ``run.prior`` to the examples of ``args.support`` (``eval.test_steps``
    SGD steps, ``meta.inner_lr``, ``meta.beta``, ``meta.n_samples``) and write the posterior
    to ``run.out`` as a PEFT LoRA folder with the abmll scale sidecar."""
    if not run.prior or not args.support:
        raise SystemExit("adapt: --prior DIR and --support FILE.jsonl are required")
    examples = read_jsonl(args.support)
    guard_adapter_folder(run.out, run.prior, run.overwrite)
    model, tokenizer, theta, status = _load_prior(run.prior, cfg)
    device = next(model.parameters()).device
    support = [b.to(device) for b in make_batches(tokenizer, examples, cfg["scoring"])]
    meta, steps = cfg["meta"], cfg["eval"].test_steps
    torch.manual_seed(meta.seed)
    before = mean_nll(model, theta, support)
    bar = tqdm(total=1, desc=f"adapt ({steps} steps, {len(examples)} examples)", unit="task")
    posterior, history = adapt(model, theta, support, steps, meta.inner_lr, meta.beta, meta.n_samples,
                                meta.inner_grad_clip)
    after = mean_nll(model, posterior, support)
    bar.update(1)
    bar.set_postfix(support_nll=f"{before:.3f}->{after:.3f}")
    bar.close()
    extra = {} if status is None else {"prior_status": status, "prior_complete": status["complete"]}
    export_peft(run.out, posterior, _adapter_config(
        cfg, model, kind="posterior", prior=str(run.prior), support=str(args.support),
        support_nll_steps=history, support_nll_before=before, support_nll_after=after, **extra), model=model)
    print(f"support NLL at the posterior mean: {before:.4f} (prior) -> {after:.4f} (posterior); "
          f"per step ({meta.n_samples} samples): {[round(h, 4) for h in history]}")
    print(f"posterior saved to {run.out} (PEFT LoRA folder: the posterior mean; abmll_scale.safetensors: its scale)")
    return Path(run.out)


def _read_inputs(path: str) -> tuple[list[Example], list[bool]]:
    """Examples of a JSON-lines file, validated by :func:`abmll.data.read_jsonl`; records
    without ``output`` are allowed (unlabelled: returned with label 0 and False in the mask)."""
    lines = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
    labelled, patched = [], []
    for raw in lines:
        try:
            record = json.loads(raw) if raw.strip() else None
        except ValueError:
            record = None
        if isinstance(record, dict) and "output" not in record and isinstance(record.get("options"), list) \
                and record["options"] and isinstance(record["options"][0], str):
            patched.append(json.dumps({**record, "output": record["options"][0]}).encode())
            labelled.append(False)
        else:
            patched.append(raw)
            if raw.strip():
                labelled.append(True)
    if all(labelled):
        return read_jsonl(path), labelled
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / Path(path).name
        tmp_path.write_bytes(b"\n".join(patched))
        try:
            examples = read_jsonl(tmp_path)
        except DataError as err:
            raise DataError(str(err).replace(str(tmp_path), str(path))) from None
    return [Example(e.input, e.options, e.label, e.source.replace(str(tmp_path), str(path))) for e in examples], labelled


PREDICTIONS, PREDICT_CONFIG = "predictions.jsonl", "predict_config.json"


def run_predict(run: RunArgs, args: PredictArgs, cfg: dict) -> Path:
    """Predict every example of ``args.input`` with the adapter ``args.adapter``, averaging
    ``eval.eval_samples`` weight samples (0: posterior mean). Writes ``run.out``/predictions.jsonl
    (per line: options, probs, prediction, prediction_index; entropy = total predictive
    entropy, aleatoric (expected entropy) and epistemic (mutual information) in nats and
    top_prob_std, see :func:`abmll.uncertainty.decompose`; abstain when ``--abstain_above``
    is set; dropped_tokens (input tokens cut to fit ``max_length``); output / correct when
    labelled) and predict_config.json (resolved config, metrics when labelled, ``complete``).

    The input and the output folder are checked before the model is loaded. Predictions are
    appended chunk by chunk (each chunk's weight samples seeded from ``sample_seed`` and its
    position, so a resumed run gives the same numbers); predict_config.json says
    ``"complete": false`` until the last one, and the same command run again continues from
    there. Finished predictions of other settings are not replaced without ``--overwrite``."""
    if not args.adapter or not args.input:
        raise SystemExit("predict: --adapter DIR and --input FILE.jsonl are required")
    examples, labelled = _read_inputs(args.input)
    out = check_writable(run.out)
    n_samples = cfg["eval"].eval_samples
    adapter_files = sorted(p for p in Path(args.adapter).iterdir() if p.suffix in (".safetensors", ".json"))
    settings = settings_hash({"config": _result_config(cfg), "adapter": file_digest(adapter_files),
                              "input": file_digest([args.input]), "eval_samples": n_samples,
                              "sample_seed": args.sample_seed, "chunk_size": args.chunk_size})
    config_path, pred_path = out / PREDICT_CONFIG, out / PREDICTIONS
    previous = _read_json_or_none(config_path)
    done_lines = []
    if previous is not None and not run.overwrite:
        if previous.get("settings") != settings or previous.get("complete", True):
            raise ValueError(f"--out {out} already holds predictions ({PREDICTIONS}"
                             + (", complete" if previous.get("complete", True) else ", of other settings")
                             + "); pass --overwrite to replace them or choose another --out")
        done_lines = _complete_lines(pred_path)
    done = len(done_lines) - len(done_lines) % args.chunk_size         # whole chunks only
    model, tokenizer, params, status = _load_prior(args.adapter, cfg)
    device = next(model.parameters()).device
    record = {**to_dict(**cfg), "adapter": str(args.adapter), "input": str(args.input), "eval_samples": n_samples,
              "sample_seed": args.sample_seed, "n": len(examples), "labelled": sum(labelled), "settings": settings}
    if status is not None:
        record.update(prior=status, prior_complete=status["complete"])
    write_json(config_path, {**record, "complete": False})
    with open(pred_path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in done_lines[:done])
    if done:
        print(f"resuming: {done} prediction(s) already in {pred_path}")
    bar = tqdm(total=len(examples), initial=done, desc=f"predict ({n_samples} samples)", unit="ex")
    truncated = 0
    for i in range(done, len(examples), args.chunk_size):
        chunk = examples[i:i + args.chunk_size]
        batches = [b.to(device) for b in make_batches(tokenizer, chunk, cfg["scoring"])]
        torch.manual_seed(args.sample_seed * 1_000_003 + i)
        samples, _ = predict_samples(model, params, batches, n_samples)
        parts = decompose(samples)
        dropped = torch.zeros(len(chunk), dtype=torch.long)
        for b in batches:
            dropped[b.example_index] = b.dropped_tokens.cpu()
        lines = [_prediction_line(ex, p[: len(ex.options)], has_label, int(d), {k: float(v[j]) for k, v in parts.items()},
                                  args)
                 for j, (ex, p, has_label, d) in enumerate(zip(chunk, samples.mean(0), labelled[i:i + len(chunk)],
                                                               dropped))]
        truncated += int((dropped > 0).sum())
        with open(pred_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        bar.update(len(chunk))
    bar.close()
    if truncated:
        print(f"warning: {truncated} input(s) were cut from the left to fit max_length={cfg['scoring'].max_length} "
              "tokens (dropped_tokens > 0 in their lines); raise --max_length to keep more", file=sys.stderr)
    summary = _prediction_metrics(pred_path) if all(labelled) else {}
    write_json(config_path, {**record, **summary, "complete": True})
    if "metrics" in summary:
        m = summary["metrics"]
        print(f"accuracy {m['accuracy']:.3f}  ECE {m['ece']:.3f}  NLL {m['nll']:.3f}  ({len(examples)} examples)")
    print(f"predictions saved to {pred_path}")
    return pred_path


def _prediction_line(ex: Example, p: torch.Tensor, has_label: bool, dropped: int, parts: dict,
                     args: PredictArgs) -> dict:
    """One line of predictions.jsonl; probabilities to 9 significant digits (float32's own
    precision, so metrics recomputed from the file match, and a tiny probability stays > 0)."""
    pred = int(p.argmax())
    line = {"input": ex.input, "options": list(ex.options), "probs": [float(f"{float(x):.9g}") for x in p],
            "prediction": ex.options[pred], "prediction_index": pred, "entropy": round(parts["total"], 6),
            "aleatoric": round(parts["aleatoric"], 6), "epistemic": round(parts["epistemic"], 6),
            "top_prob_std": round(parts["top_prob_std"], 6), "dropped_tokens": dropped}
    if args.abstain_above is not None:
        line["abstain"] = parts[args.abstain_on] > args.abstain_above
    if has_label:
        line.update(output=ex.options[ex.label], correct=pred == ex.label)
    return line


def _prediction_metrics(path: Path) -> dict:
    """Metrics of a labelled predictions.jsonl (probabilities as written, padded to the widest)."""
    lines = [json.loads(line) for line in _complete_lines(path)]
    width = max(len(line["probs"]) for line in lines)
    probs = torch.tensor([line["probs"] + [0.0] * (width - len(line["probs"])) for line in lines])
    labels = torch.tensor([line["options"].index(line["output"]) for line in lines])
    return {"metrics": compute_metrics(probs, labels), "ece_scheme": ECE_SCHEME}


def _complete_lines(path: Path) -> list[str]:
    """The lines of a JSON-lines file up to the first one that is not whole JSON (cut short)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            json.loads(line)
        except ValueError:
            break
        lines.append(line)
    return lines


def _read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None


def run_export(run: RunArgs, args: ExportArgs, cfg: dict) -> Path:
    """Write the abmll adapter ``args.adapter`` as a PEFT LoRA folder (+ scale sidecar) in ``run.out``."""
    if not args.adapter:
        raise SystemExit("export: --adapter DIR is required")
    guard_adapter_folder(run.out, args.adapter, run.overwrite)
    _, saved = load_adapter_folder(args.adapter)
    model, _, tensors, _ = _load_prior(args.adapter, cfg)
    config = {**saved, **to_dict(**{g: cfg[g] for g in ("model", "lora")}), "exported_from": str(args.adapter)}
    config.pop("format", None)
    export_peft(run.out, tensors, config, model=model, base_model_name_or_path=args.base_model_name_or_path)
    print(f"PEFT LoRA adapter (posterior mean) + abmll_scale.safetensors written to {run.out}")
    return Path(run.out)


def run_data(run: RunArgs, args: DataArgs) -> dict:
    """Convert ``args.dataset`` / ``args.data_files`` into the k-shot layout under ``run.out``."""
    if not args.task:
        raise SystemExit("data: --task NAME is required")
    files = {}
    for item in args.data_files:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            raise SystemExit(f"data: --data_files takes split=path pairs, got {item!r}")
        files[split] = path
    if args.dataset:
        splits = load_hf_dataset(args.dataset, args.dataset_config, files or None)
    elif files:
        splits = {split: read_jsonl_rows(path) for split, path in files.items()}
    else:
        raise SystemExit("data: give --dataset NAME_OR_PATH or --data_files split=path.jsonl ...")
    if not args.input_columns and args.input_template is None:
        raise SystemExit("data: give --input_columns COL [COL ...] or --input_template")
    report = convert_dataset(splits, args.task, run.out, args, args.shots, args.data_seeds, args.train_split,
                             args.test_split, args.test_rows)
    write_json(Path(run.out) / args.task / "abmll_data_config.json", {"data": asdict(args), "report": report})
    for split, counts in report["counts"].items():
        print(f"{split}: {counts}")
    print(f"task {args.task!r} ({report['task_type']}) written to {Path(run.out) / args.task}")
    return report


class _writer:
    """Context manager: the SummaryWriter of ``report`` (or None), flushed and closed on exit."""

    def __init__(self, report: ReportArgs) -> None:
        self.writer = _summary_writer(report)

    def __enter__(self):
        return self.writer

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def _close_bars() -> None:
    """End every open progress bar's line, so a message printed next starts on its own line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _saved_note(command: str, run: RunArgs | None) -> str:
    """What an interrupted ``command`` left in ``run.out`` and how to continue."""
    if run is None:
        return "nothing was written"
    out = Path(run.out)
    if command in ("meta-train", "demo"):
        state = _read_json_or_none(out / CHECKPOINT_DIR / STATE)
        if state is None:
            return f"no checkpoint was written yet in {out} (--save_every {run.save_every})"
        return (f"the run is saved at meta-step {state['step']} in {out}; continue it with the same command "
                "and --resume")
    if command in ("evaluate", "predict"):
        log = out / (PARTIAL_RESULTS if command == "evaluate" else PREDICTIONS)
        n = max(len(_complete_lines(log)) - (command == "evaluate"), 0)
        return f"{n} finished result line(s) kept in {log}; run the same command again to resume"
    return f"nothing was written to {out} (it is written only when complete)"


def main(argv: list[str] | None = None) -> int:
    """Run one ``abmll`` command (``argv`` default: ``sys.argv[1:]``). Returns the exit
    status: 0 done (or ``--help``), 1 a reported error (bad data, non-finite loss, bad
    value, unreadable file or checkpoint: one line on stderr, finished outputs kept),
    2 no or unknown command (the usage is printed), 130 interrupted (Ctrl-C: one line
    saying what was saved and how to resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    start = time.perf_counter()
    run = None
    try:
        if command == "meta-train":
            run, cfg, (report,) = _parse_with(rest, ALL_GROUPS, (ReportArgs,))
            with _writer(report) as writer:
                meta_train(run, cfg, report, writer)
        elif command == "evaluate":
            run, cfg, (report,) = _parse_with(rest, ALL_GROUPS, (ReportArgs,), adapter_flag="prior")
            if not run.prior:
                raise SystemExit("evaluate: --prior DIR is required")
            check_evaluate_inputs(run, cfg)
            model, tokenizer, theta, status = _load_prior(run.prior, cfg)
            with _writer(report) as writer:
                run_evaluate(run, cfg, model, tokenizer, theta, report, writer, prior=status)
        elif command == "demo":
            replace = [] if "--resume" in rest else ["--overwrite"]      # a demo run replaces the previous one
            run, cfg, (report,) = _parse_with(["--config", str(DEMO_CONFIG), "--out", "runs/demo", *replace] + rest,
                                              ALL_GROUPS, (ReportArgs,))
            check_evaluate_inputs(run, cfg)
            with _writer(report) as writer:
                run_evaluate(run, cfg, *meta_train(run, cfg, report, writer), report, writer)
        elif command == "adapt":
            run, cfg, (args,) = _parse_with(rest, ["model", "lora", "scoring", "meta", "eval"], (AdaptArgs,),
                                            adapter_flag="prior")
            run_adapt(run, args, cfg)
        elif command == "predict":
            run, cfg, (args,) = _parse_with(rest, ["model", "lora", "scoring", "eval"], (PredictArgs,),
                                            adapter_flag="adapter")
            run_predict(run, args, cfg)
        elif command == "export":
            run, cfg, (args,) = _parse_with(rest, ["model", "lora"], (ExportArgs,), adapter_flag="adapter")
            run_export(run, args, cfg)
        else:
            run, _, (args,) = _parse_with(rest, [], (DataArgs,))
            run_data(run, args)
    except (DataError, NonFiniteLossError, ValueError, OSError) as err:
        _close_bars()
        print(f"abmll {command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _close_bars()
        print(f"abmll {command}: interrupted; {_saved_note(command, run)}", file=sys.stderr)
        return 130
    finally:
        # under `accelerate launch`: shut the process group down before interpreter exit
        # (left to the exit handlers, gloo sometimes aborted an FSDP run that had finished)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(f"wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
