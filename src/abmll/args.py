"""The command-line arguments of ``abmll``: one dataclass per concern (typed; the same
classes are the Python API's), and the parser that fills them.

Every field's help is the one place it is documented: the ``Attributes:`` section of its
class's docstring, copied into the field's metadata (as peft's ``LoraConfig`` keeps its help
in ``metadata``) so ``abmll <command> --help`` shows it. ``Literal`` fields list their choices.
Defaults, lowest first: the dataclasses', the config saved with the adapter a command reads,
the ``--config`` YAML file, then the flags.
"""

from __future__ import annotations

import argparse
import json
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from abmll.checkpoint import CONFIG, CheckpointError
from abmll.checks import at_least, non_empty, one_of, seeds
from abmll.config import CONFIG_GROUPS, RunConfig, from_dict
from abmll.convert import ColumnMapping
from abmll.flags import unknown_flag
from abmll.priors import resolve_adapter
from abmll.roles import OUTER, is_inherited, setting, without_marks
from abmll.targets import AUTO_TARGETS
from abmll.uncertainty import ABSTAIN_SCORES


@dataclass
class RunArgs:
    """Options of every command.

    Attributes:
        config: YAML file of defaults (flags override it).
        out: output folder (runs/<command> unless given).
        overwrite: replace what ``out`` already holds (a run, results, predictions, an
            adapter) instead of refusing; without it a finished output is never replaced and
            partial results of the same settings are resumed.
        verbose: also show the libraries' own output (transformers' and peft's warnings and
            logs, the weight-loading bar), which is hidden by default.
    """

    config: str | None = None
    out: str | None = None
    overwrite: bool = False
    verbose: bool = False


@dataclass
class TrainArgs:
    """Meta-training options (meta-train, demo).

    Attributes:
        save_every: write the prior and the trainer state every N meta-steps (0: only at the end).
        resume: continue the run saved in ``out`` (its ``checkpoint/``) exactly where it stopped.
        skip_nonfinite: skip a meta-batch whose loss or gradient is NaN/inf (logged in the
            history) instead of stopping with an error.
        validate_every: meta-train: score the prior on ``--val_tasks`` before the first
            meta-step and every N meta-steps (adapt ``--test_steps`` on the train file, predict
            the dev file with ``--eval_samples``); the curve goes to validation.json and
            validation_curve.png, the prior with the lowest validation NLL to ``<out>/best/``.
            0: no validation.
    """

    save_every: int = 10
    resume: bool = False
    skip_nonfinite: bool = False
    validate_every: int = 0

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
    log_support_after: bool = setting(False, role=OUTER)


@dataclass
class EvaluateArgs:
    """``abmll evaluate``: the prior to evaluate.

    Attributes:
        prior: a prior folder written by ``abmll meta-train``, or a shipped prior's name.
        methods: methods of the registry (``abmll.methods``) to run, each adapted and
            predicted as the eval flags say: zero_shot, abmll and abmll_ts_support (from
            --prior), lora, bayes_lora, lora_ensemble, lora_mc_dropout, laplace_lora,
            laplace_lora_lin and lora_ts_support (from the untrained prior). The ones that
            need a multi-task or Reptile prior or a temperature fitted on meta-validation
            data are run by benchmarks/quality.py.
    """

    prior: str | None = None
    methods: list[str] = field(default_factory=lambda: ["zero_shot", "abmll"])


@dataclass
class AdaptArgs:
    """``abmll adapt``: the posterior goes to ``--out`` (PEFT format).

    Attributes:
        prior: a prior folder written by ``abmll meta-train``, or a shipped prior's name.
        support: JSON-lines file of labelled examples (the data format of ``abmll.data``).
    """

    prior: str | None = None
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
        abstain_above: mark an example ``"abstain": true`` when its uncertainty (``abstain_on``)
            exceeds this value (selective prediction); None: never.
        abstain_on: the uncertainty abstention applies to: "total" (predictive entropy, nats),
            "epistemic" (mutual information between the answer and the weights, nats) or
            "normalised" (predictive entropy / log(number of options): 0 certain, 1 uniform).
        abstain_dev: labelled rows of the task (JSON lines, not the support) on which to choose
            the abstention threshold for ``target_accuracy`` or ``target_coverage``, instead of
            giving ``abstain_above``.
        target_accuracy: with ``abstain_dev``: abstain as little as possible while the kept dev
            rows are right at least this often (0-1).
        target_coverage: with ``abstain_dev``: keep (answer) at least this share of the dev rows
            (0-1), abstaining on the most uncertain rest.
        support: the task's labelled support file (JSON lines, e.g. the one given to ``abmll
            adapt``): the in-context demonstrations of an adapter with ``--demonstrations`` > 0.
    """

    adapter: str | None = None
    input: str | None = None
    support: str | None = None
    sample_seed: int = 0
    chunk_size: int = 8
    abstain_above: float | None = None
    abstain_on: Literal["total", "epistemic", "normalised"] = "total"
    abstain_dev: str | None = None
    target_accuracy: float | None = None
    target_coverage: float | None = None

    def __post_init__(self) -> None:
        at_least(self, ("chunk_size",), 1)
        seeds(self, ("sample_seed",))
        one_of(self, "abstain_on", ABSTAIN_SCORES)
        if self.abstain_above is not None:
            at_least(self, ("abstain_above",), 0)
        targets = [f for f in ("target_accuracy", "target_coverage") if getattr(self, f) is not None]
        for name in targets:
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"--{name} must be in (0, 1], got {getattr(self, name)}")
        if bool(self.abstain_dev) != bool(targets) or len(targets) > 1:
            raise ValueError("--abstain_dev FILE goes with exactly one of --target_accuracy and --target_coverage")
        if self.abstain_dev and self.abstain_above is not None:
            raise ValueError("--abstain_above is chosen on --abstain_dev; give one or the other")


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
        test_fraction: instead of a test split, hold out this fraction of the training split
            as the test file, stratified by answer (e.g. 0.2 for a dataset of one file).
        holdout_seed: the seed of that held-out draw.
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
    test_fraction: float | None = None
    holdout_seed: int = 0
    shots: list[int] = field(default_factory=lambda: [16, 8])
    data_seeds: list[int] = field(default_factory=lambda: [100, 13, 21, 42, 87])
    test_rows: int | None = None

    def __post_init__(self) -> None:
        non_empty(self, ("shots", "data_seeds"))
        seeds(self, ("data_seeds",))
        if min(self.shots) < 1:
            raise ValueError(f"--shots must all be >= 1, got {self.shots}")


COMMAND_ARGS = (TrainArgs, ReportArgs, EvaluateArgs, AdaptArgs, PredictArgs, ExportArgs, DataArgs)


TRAIN_GROUPS = ["model", "lora", "hyperprior", "scoring", "meta", "tasks"]


ALL_GROUPS = TRAIN_GROUPS + ["eval"]


def with_help(cls):
    """``cls`` (a dataclass) with each field's help, taken from the ``Attributes:`` section of
    its docstring (and of its dataclass bases), in the field's metadata; returns ``cls``."""
    docs = {}
    for klass in reversed(cls.__mro__):
        docs.update(_attribute_docs(klass.__doc__ or ""))
    for f in fields(cls):
        if f.name in docs and "help" not in f.metadata:
            f.metadata = types.MappingProxyType({**f.metadata, "help": docs[f.name]})
    return cls


def _attribute_docs(doc: str) -> dict[str, str]:
    """``{name: text}`` of a Google-style ``Attributes:`` section (continuation lines joined)."""
    out, name, inside = {}, None, False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            inside, indent = True, None
            continue
        if not inside:
            continue
        if not stripped:
            name = None
            continue
        lead = len(line) - len(line.lstrip())
        indent = lead if indent is None else indent
        if lead < indent:
            break
        head, sep, text = stripped.partition(":")
        if lead == indent and sep and all(part.strip().isidentifier() for part in head.split(",")):
            for part in head.split(","):
                out[part.strip()] = text.strip()
            name = [part.strip() for part in head.split(",")]
        elif name:
            for n in name:
                out[n] += " " + stripped
    return {k: v.replace("%", "%%") for k, v in out.items()}


class ArgParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line and a pointer to ``--help``, instead of
    argparse's usage block (dozens of lines for a command with every config group)."""

    @staticmethod
    def _parse_dataclass_field(parser, field):  # argparse takes the metadata as keywords: not the role marks
        HfArgumentParser._parse_dataclass_field(parser, without_marks(field))

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(run '{self.prog} --help' for every flag and its choices)\n")


def build_parser(
    groups: list[str], extra: tuple = (), command: str = "", default_out: str | None = None, unused: tuple[str, ...] = ()
) -> tuple[ArgParser, list[type]]:
    """The parser of ``abmll <command>`` (see :func:`parse_args`) and its dataclasses, in order."""
    classes = [with_help(c) for c in [RunArgs, *extra] + [CONFIG_GROUPS[g] for g in groups]]
    parser = ArgParser(classes, prog=f"abmll {command}".strip(), allow_abbrev=False)
    parser.set_defaults(out=default_out)
    if "lora" in groups:
        parser.set_defaults(target_modules=[AUTO_TARGETS])
    for action in [a for a in parser._actions if a.dest in unused]:
        parser._defaults.setdefault(action.dest, action.default)  # still filled, from the defaults
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            parser._option_string_actions.pop(option, None)
    return parser, classes


def parse_args(
    argv: list[str],
    groups: list[str],
    extra: tuple = (),
    adapter_flag: str | None = None,
    command: str = "",
    default_out: str | None = None,
    unused: tuple[str, ...] = (),
):
    """Parse ``argv`` into (RunArgs, RunConfig, [extra dataclasses]) for ``abmll <command>``.

    Defaults, lowest first: the dataclasses' (``target_modules`` is "auto": the architecture's
    preset; ``out`` is ``default_out``), the config saved in the adapter folder named by
    ``--<adapter_flag>`` (for evaluate its tasks settings too, but data_dir), the ``--config``
    YAML file, then the flags. A ``--split`` given as a flag is not overridden by task lists
    from the file or the saved config (they are cleared unless given as flags too). Fields in
    ``unused`` (of the groups, but not used by this command) are not flags: they keep their
    saved / file / default values and do not clutter ``--help``.

    Raises:
        SystemExit: ``--help`` (after printing it), or an unknown flag (naming the nearest ones).
        ValueError: a value a config refuses (naming the flag).
    """
    parser, classes = build_parser(groups, extra, command, default_out, unused)
    check_flags(argv, parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    if adapter_flag:
        pre.add_argument(f"--{adapter_flag}")
    known, _ = pre.parse_known_args(argv)
    file_defaults = {}
    if known.config:
        try:
            file_defaults = config_file_defaults(known.config, classes)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    folder = getattr(known, adapter_flag, None) if adapter_flag else None
    folder = folder or file_defaults.get(adapter_flag)
    if folder:
        parser.set_defaults(**_saved_defaults(str(resolve_adapter(folder)), groups))
    parser.set_defaults(**file_defaults)
    run, *rest = parser.parse_args_into_dataclasses(argv)
    for parsed in (run, *rest[: len(extra)]):  # a shipped prior's short name -> its folder
        if adapter_flag and getattr(parsed, adapter_flag, None):
            setattr(parsed, adapter_flag, str(resolve_adapter(getattr(parsed, adapter_flag))))
    cfg = RunConfig(**dict(zip(groups, rest[len(extra) :])))
    given = {a.split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    if cfg.tasks is not None and "__split" in given:
        for name in ("train_tasks", "test_tasks"):
            if f"__{name}" not in given:
                setattr(cfg.tasks, name, [])
    return run, cfg, rest[: len(extra)]


def parse_dataclasses(
    argv: list[str], classes: list[type], prog: str, description: str | None = None, defaults: dict | None = None
) -> tuple:
    """``argv`` parsed into one instance of each dataclass in ``classes`` by the CLI's parser
    (help from the ``Attributes:`` docstrings, ``Literal`` fields as choices, no abbreviations):
    the entry of a benchmark script. ``defaults`` (flag name -> value) replace the dataclasses'.

    Raises:
        SystemExit: ``--help`` (after printing it), an unknown flag (naming the nearest ones)
            or a value argparse refuses.
    """
    parser = ArgParser([with_help(c) for c in classes], prog=prog, description=description, allow_abbrev=False)
    parser.set_defaults(**(defaults or {}))
    check_flags(argv, parser)
    return tuple(parser.parse_args_into_dataclasses(argv))


def check_flags(argv: list[str], parser) -> None:
    """Raises SystemExit naming the nearest known flags for a flag ``parser`` does not take."""
    message = unknown_flag(argv, parser._option_string_actions, parser.prog)
    if message:
        raise SystemExit(message)


def _saved_defaults(folder: str, groups: list[str]) -> dict:
    """Flat flag defaults from ``folder/abmll_config.json`` for ``groups`` (not the machine
    fields, nor the data folder and the tasks the prior was trained and validated on)."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {folder} an abmll adapter folder?)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    flat = {}
    for group in groups:
        if not isinstance(saved.get(group), dict):
            continue
        try:
            checked = asdict(from_dict(saved, group, str(path)))  # refuses an invalid value, naming the field
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        skip = {f.name for f in fields(CONFIG_GROUPS[group]) if not is_inherited(f)}  # where it ran, on what
        flat.update({k: v for k, v in checked.items() if k in saved[group] and k not in skip})
    return flat


def config_file_defaults(path: str | Path, classes, sections: dict | None = None) -> dict:
    """The flag defaults a YAML config file gives the dataclasses ``classes``: the one way from
    a config file to configs (the CLI's ``--config``, demo.yaml, the benchmarks' presets); see
    :func:`flatten_config` for the layout and ``sections``.

    Raises:
        ValueError: the file cannot be read or parsed, or holds an unknown key; the message
            names the file (and the key).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"config: cannot read {path} ({err})") from None
    try:
        return flatten_config(raw, classes, sections)
    except ValueError as err:
        raise ValueError(f"config {path}: {err}") from None


def flatten_config(raw: dict, classes, sections: dict | None = None) -> dict:
    """YAML -> flat flag defaults for ``classes``; accepts ``{section: {field: value}}`` (a
    config group, or one of ``sections``: name -> dataclass, e.g. a benchmark's own flags) or
    flat keys. Keys of other commands' options and config groups are ignored (one file serves
    every command).

    Raises:
        ValueError: the top level is not a mapping, or a key is unknown (naming it).
    """
    if not isinstance(raw, dict):
        raise ValueError(f"the top level must be a mapping of flag names (or sections) to values, not a {type(raw).__name__}")
    groups = {**CONFIG_GROUPS, **(sections or {})}
    names = {f.name for c in classes for f in fields(c)}
    anywhere = names | {f.name for c in [RunArgs, *COMMAND_ARGS, *groups.values()] for f in fields(c)}
    flat = {}
    for key, value in raw.items():
        section = isinstance(value, dict) and key in groups
        items = value.items() if section else [(key, value)]
        used = not section or groups[key] in classes  # a section of a group this command lacks: skipped
        for k, v in items:
            if k not in (_fields_of(groups[key]) if section else anywhere):
                raise ValueError(f"unknown key {k!r}" + (f" in section {key!r}" if section else ""))
            if used and k in names:
                flat[k] = v
    return flat


def _fields_of(cls) -> set[str]:
    return {f.name for f in fields(cls)}
