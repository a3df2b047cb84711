"""What the benchmark scripts share, so that each script is a thin entry.

Every script: its entry (the CLI's parser on a dataclass of flags, :func:`parse`), the command
line recorded with a result, the results writer (JSON + Markdown side by side in
benchmarks/results/) and table helpers.

The method comparison of benchmarks/quality.py, tune_adaptation.py and tune_outer.py: its flags
(:class:`BenchArgs`, :func:`parse_bench`: the SmolLM2 defaults of src/abmll/demo.yaml, the
--quick preset), the split's usable tasks, each method's configuration and what its results
depend on (:func:`method_config`, :func:`prior_config`), the meta-trained priors
(:func:`train_kind`), the run with its result :class:`Cache` keyed by configuration hash
(:func:`run`) and the aggregation (means, 95% cluster-bootstrap intervals, paired differences,
:func:`aggregate`). The tiny random model of smoke runs is :mod:`abmll.testing`'s, shared with
the test suite."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml

from abmll.args import parse_dataclasses
from abmll.bayes_lora import BayesLoraModel
from abmll.checkpoint import write_json
from abmll.config import CONFIG_GROUPS, DATA_SEEDS, DEMO_CONFIG, OUTER_LOOP, changed_added_fields, group_dict
from abmll.data import DataError, check_tasks, load_episode, load_split, resolve_data_dir, task_meta
from abmll.episodes import episode_batches
from abmll.evaluate import run_method, summarise, support_temperature
from abmll.meta import MetaConfig
from abmll.methods import ADAPTING_METHOD, METHODS, get_spec, make_method, prior_kinds, prior_meta_config, train_prior
from abmll.metrics import ECE_SCHEME, bootstrap_mean_ci, compute_metrics, macro_f1
from abmll.models import load_base_model, resolve_device
from abmll.plots import pool_predictions
from abmll.scoring import make_batches, merge_truncation, truncation_summary
from abmll.temperature import apply_temperature, fit_temperature, tempered_nll
from abmll.testing import tiny_llama, tiny_tokenizer
from abmll.validation import make_validator

RESULTS = Path(__file__).parent / "results"
"""Where committed results live: ``<name>.json`` and ``<name>.md`` per benchmark run."""


def parse(
    argv: list[str] | None, *classes: type, script: str, description: str | None = None, defaults: dict | None = None
) -> tuple:
    """``argv`` (default ``sys.argv[1:]``) parsed into one instance of each dataclass in
    ``classes`` by :func:`abmll.args.parse_dataclasses`: ``--help`` lists each field with the
    help of its ``Attributes:`` docstring; an unknown flag names the nearest ones.
    ``script``: the file name shown in usage (``benchmarks/<script>``); ``defaults`` (flag
    name -> value) replace the dataclasses' (e.g. a preset)."""
    argv = sys.argv[1:] if argv is None else argv
    return parse_dataclasses(list(argv), list(classes), f"benchmarks/{script}", description, defaults)


def command_line(script: str, argv: list[str] | None = None, prefix: str = ".venv/bin/python") -> str:
    """The command that reproduces a run, as recorded in its results: ``prefix
    benchmarks/<script> <argv>`` (shell-quoted; ``argv`` defaults to ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join([prefix, f"benchmarks/{script}", shlex.join(argv)]).rstrip()


def write_results(name: str, result: dict, markdown: str, folder: Path = RESULTS) -> None:
    """Write ``folder/<name>.json`` (``result``, indented, written atomically) and
    ``folder/<name>.md`` (``markdown``, ending in one newline)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", result)
    (folder / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals for a results table; "nan" for None or NaN, "inf" for inf."""
    if x is None or math.isnan(x):
        return "nan"
    return str(x) if math.isinf(x) else f"{x:.{digits}f}"


def diff_cell(d: dict) -> str:
    """A paired difference ``{"diff", "ci95": [lo, hi]}`` as a table cell: "+0.005 [-0.017, +0.026]"."""
    return f"{d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


INTERVALS = "95% percentile cluster bootstrap: tasks resampled with their seeds, 2000 resamples, seed 0"
"""How every interval of the method comparison is computed (:func:`abmll.metrics.bootstrap_mean_ci`
at its defaults, the (task, seed) units clustered by task); recorded with the results."""


def choice_table(rows: dict[str, dict], columns: list[str], chosen: dict[str, str], cell: Callable[[dict], str]) -> list[str]:
    """Markdown lines of a tuning table: a row per setting, a column per method (or prior kind),
    ``cell(rows[setting][column])`` in each, the setting ``chosen[column]`` in bold."""
    lines = ["| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for setting, r in rows.items():
        cells = [f"**{cell(r[c])}**" if chosen.get(c) == setting else cell(r[c]) for c in columns]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def config_hash(config: dict) -> str:
    """10 hex digits of the SHA-1 of ``config`` as sorted JSON (non-JSON values by ``str``)."""
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Cache:
    """(method, task, seed, config hash) -> {"metrics", "probs", "labels", ...}, in one JSON
    file rewritten atomically after each result. The hash is of the config the method's
    result depends on (e.g. :func:`method_config`), so a changed setting recomputes only
    the methods it affects, and results of several settings (e.g. a sweep) live side by side.

    Raises:
        ValueError: ``path`` exists but is not a cache file (not JSON, or without "results").
    """

    def __init__(self, path: Path, configs: dict[str, dict], fresh: bool = False) -> None:
        self.path = path
        self.hashes = {m: config_hash(c) for m, c in configs.items()}
        self.results: dict[str, dict] = {}
        if path.is_file() and not fresh:
            try:
                self.results = json.loads(path.read_text())["results"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: not a benchmark cache ({err}); move it away or pass --fresh") from None

    def key(self, method: str, task: str, seed: int) -> str:
        return f"{method}|{task}|{seed}|{self.hashes[method]}"

    def get(self, method: str, task: str, seed: int) -> dict | None:
        return self.results.get(self.key(method, task, seed))

    def put(self, method: str, task: str, seed: int, entry: dict) -> None:
        self.results[self.key(method, task, seed)] = entry
        write_json(self.path, {"results": self.results})


# -- the method comparison (benchmarks/quality.py, tune_adaptation.py, tune_outer.py) --------

METRICS = ("accuracy", "macro_f1", "ece", "nll", "brier", "aurc")
TINY_MODEL = "tiny-random"
"""``--model tiny-random``: a 2-layer random Llama with a byte-level tokenizer, built offline."""

DEMO_ONLY = ("train_tasks", "test_tasks", "data_seeds", "compare_priors", "log_support_after")
"""Keys of src/abmll/demo.yaml that pick the demo's own tasks and comparisons: the benchmark
runs a split's tasks instead."""
BENCHMARK_OVERRIDES = dict(eval_samples=4, skip_missing=True)
"""Where the benchmark's SmolLM2 defaults depart from src/abmll/demo.yaml (the settings tuned
on dev data, shared by the demo and this benchmark): at least 4 weight samples per
prediction, and a split's tasks absent from the data are skipped (and named)."""
QUICK_DEFAULTS = dict(
    model=TINY_MODEL,
    rank=2,
    alpha=4.0,
    target_modules=["q_proj", "v_proj"],
    max_length=64,
    max_rows=8,
    inner_steps=1,
    inner_lr=0.3,
    meta_batch_size=2,
    meta_steps=2,
    k=8,
    max_query=4,
    test_steps=2,
    eval_samples=2,
    max_test=8,
    skip_missing=True,
    data_seeds=DATA_SEEDS[:2],
    seeds=DATA_SEEDS[:2],
    max_train_tasks=3,
    max_test_tasks=2,
    save_every=0,
    ensemble_members=2,
    support_folds=2,
)


@dataclass
class BenchArgs:
    """Options of the quality benchmark (all config groups of ``abmll`` are flags too).

    Attributes:
        config: YAML file of defaults (flat keys or grouped by section; flags override it).
        methods: registry names (abmll.methods.METHODS) to run.
        seeds: data seeds of the held-out tasks (support = their k-shot train file).
        quick: smoke-test settings (tiny random model, 2 meta-steps, 2 tasks x 2 seeds).
        eval_split: "test" (the split's held-out tasks) or "dev" (tuning: --test_tasks must be
            held-out *train* tasks; their dev files are the query sets, and they are removed
            from the meta-train tasks).
        out_dir: where the JSON, Markdown and PNGs go (default benchmarks/results; runs/quality-quick with --quick).
        work_dir: priors and the result cache (default runs/<stem>[-quick]).
        max_options: meta-train only on tasks with at most this many options per example
            (each example costs one scored row per option).
        max_train_tasks: at most this many meta-train tasks, in split order (0: all usable).
        max_test_tasks: at most this many held-out tasks, in split order (0: all usable).
        save_every: save the priors every N meta-steps (0: at the end).
        threads: torch threads (0: torch's default).
        fresh: discard the cache and the saved priors of ``work_dir``.
        sweep: "field=v1,v2,...": rerun for each value of a config field (e.g. beta) and write
            a sensitivity table <stem>-sweep-<field>.{json,md} of accuracy, macro-F1 and ECE.
        plots: write the reliability diagrams.
        validate_every: validate each meta-trained prior on ``--val_tasks`` (train tasks of the
            split held out of meta-training; their dev files are the query sets) every N
            meta-steps and evaluate the one with the lowest validation NLL (0: the last one).
        val_seeds: data seeds of the validation episodes.
        adaptation: per-method test-time adaptation, "METHOD=OPTIMIZER:STEPS:LR" (e.g.
            "lora=adamw:15:0.003"); a method not named adapts with --test_optimizer,
            --test_steps and --test_lr (default --inner_lr).
        test_k: shots of the held-out tasks' support sets (0: --k, the meta-training episodes').
        outer: per-prior-kind outer loop, "KIND=LR:WARMUP:CLIP" (kind abmll, multitask or
            reptile; outer_lr, outer_warmup_steps, outer_grad_clip with 0 for no clipping; e.g.
            "reptile=0.003:25:1.0", as benchmarks/tune_outer.py chooses them); a kind not named
            trains with --outer_lr, --outer_warmup_steps and --outer_grad_clip.
    """

    config: str | None = None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: list(DATA_SEEDS))
    quick: bool = False
    eval_split: str = "test"
    out_dir: str | None = None
    work_dir: str | None = None
    max_options: int = 10
    max_train_tasks: int = 0
    max_test_tasks: int = 0
    save_every: int = 5
    threads: int = 0
    fresh: bool = False
    sweep: str | None = None
    plots: bool = True
    validate_every: int = 0
    val_seeds: list[int] = field(default_factory=lambda: [100, 13])
    adaptation: list[str] = field(default_factory=list)
    test_k: int = 0
    outer: list[str] = field(default_factory=list)


GROUPS = ["model", "lora", "hyperprior", "scoring", "meta", "tasks", "eval"]


def parse_bench(argv: list[str], extra: tuple[type, ...] = (), script: str = "quality.py") -> tuple:
    """(BenchArgs, {group: config}, *one instance of each ``extra`` dataclass: the flags of
    ``script``, built on this one). Defaults, lowest first: the dataclasses', the SmolLM2 (or, with
    --quick, the smoke-test) preset, the --config file, the flags."""
    classes = [BenchArgs, *extra] + [CONFIG_GROUPS[g] for g in GROUPS]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--quick", nargs="?", const="true", default="false")
    known, _ = pre.parse_known_args(argv)
    quick = str(known.quick).lower() in ("true", "1", "yes")
    defaults = dict(QUICK_DEFAULTS if quick else smollm2_defaults(classes))
    if known.config:
        defaults.update(_yaml_defaults(known.config, classes))
    bench, *parsed = parse(argv, *classes, script=script, defaults=defaults)
    extras, cfg = parsed[: len(extra)], dict(zip(GROUPS, parsed[len(extra) :]))
    for name in bench.methods:
        get_spec(name)
    for name in adaptations(bench):
        if name not in bench.methods:
            raise SystemExit(f"--adaptation names {name!r}, which is not in --methods")
    for name in bench.methods:
        try:
            method_eval(name, cfg, bench)
        except ValueError as err:
            raise SystemExit(f"--adaptation {name}: {err}") from None
    for kind in outer_settings(bench):
        try:
            kind_cfg(kind, cfg, bench)
        except ValueError as err:
            raise SystemExit(f"--outer {kind}: {err}") from None
    if bench.eval_split not in ("test", "dev"):
        raise SystemExit(f"--eval_split must be test or dev, got {bench.eval_split!r}")
    return (bench, cfg, *extras)


def adaptations(bench: BenchArgs) -> dict[str, tuple[str, int, float]]:
    """``--adaptation`` as {method: (optimizer, steps, lr)}.

    Raises:
        SystemExit: an entry not of the form METHOD=OPTIMIZER:STEPS:LR.
    """
    out = {}
    for entry in bench.adaptation:
        name, _, how = entry.partition("=")
        parts = how.split(":")
        try:
            if len(parts) != 3:
                raise ValueError(entry)
            out[name] = (parts[0], int(parts[1]), float(parts[2]))
        except ValueError:
            raise SystemExit(f"--adaptation takes METHOD=OPTIMIZER:STEPS:LR (e.g. lora=adamw:15:0.003), got {entry!r}") from None
    return out


def method_eval(name: str, cfg: dict, bench: BenchArgs):
    """The eval config method ``name`` adapts with: --adaptation's entry for it, else that of
    the entry whose recipe it uses (``MethodSpec.recipe``), else the group's.

    Raises:
        ValueError: an optimizer, step count or learning rate the config refuses.
    """
    ev = cfg["eval"]
    given = adaptations(bench)
    how = given.get(name, given.get(get_spec(name).base))
    if how is None:
        return ev
    optimizer, steps, lr = how
    return replace(ev, test_optimizer=optimizer, test_steps=steps, test_lr=lr)


TRAINED_KINDS = ("abmll", "multitask", "reptile")
"""The prior kinds that are meta-trained (``init`` is not)."""


def outer_point(text: str) -> dict:
    """ "LR:WARMUP:CLIP" as the meta-config fields outer_lr, outer_warmup_steps, outer_grad_clip.

    Raises:
        SystemExit: not three fields, or not numbers.
    """
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError(text)
        return dict(outer_lr=float(parts[0]), outer_warmup_steps=int(parts[1]), outer_grad_clip=float(parts[2]))
    except ValueError:
        raise SystemExit(f"an outer-loop setting is LR:WARMUP:CLIP (e.g. 0.003:25:1.0), got {text!r}") from None


def outer_settings(bench: BenchArgs) -> dict[str, dict]:
    """``--outer`` as {kind: {"outer_lr", "outer_warmup_steps", "outer_grad_clip"}}.

    Raises:
        SystemExit: an entry not of the form KIND=LR:WARMUP:CLIP, or not a trained kind.
    """
    out = {}
    for entry in bench.outer:
        kind, _, how = entry.partition("=")
        if kind not in TRAINED_KINDS:
            raise SystemExit(f"--outer takes KIND=LR:WARMUP:CLIP with KIND one of {TRAINED_KINDS}, got {entry!r}")
        out[kind] = outer_point(how)
    return out


def kind_cfg(kind: str, cfg: dict, bench: BenchArgs | None) -> dict:
    """``cfg`` with the meta group prior ``kind`` trains with: ``--outer``'s settings for it,
    else ``cfg`` itself.

    Raises:
        ValueError: a value the meta config refuses (e.g. a negative learning rate).
    """
    how = None if bench is None else outer_settings(bench).get(kind)
    return cfg if how is None else {**cfg, "meta": replace(cfg["meta"], **how)}


def test_k(bench: BenchArgs, cfg: dict) -> int:
    """Shots of the held-out support sets (``--test_k``, default the meta-training ``--k``)."""
    return bench.test_k or cfg["tasks"].k


def smollm2_defaults(classes) -> dict:
    """The benchmark's SmolLM2 defaults: src/abmll/demo.yaml without :data:`DEMO_ONLY`, with
    :data:`BENCHMARK_OVERRIDES`."""
    return {**_yaml_defaults(str(DEMO_CONFIG), classes, drop=DEMO_ONLY), **BENCHMARK_OVERRIDES}


def _yaml_defaults(path: str, classes, drop=()) -> dict:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    names = {f.name for c in classes for f in fields(c)}
    flat = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) and (key in CONFIG_GROUPS or key == "bench") else [(key, value)]
        for k, v in items:
            if k in drop:
                continue
            if k not in names:
                raise SystemExit(f"config {path}: unknown key {k!r}")
            flat[k] = v
    return flat


def stem(bench: BenchArgs, cfg: dict) -> str:
    """The quality benchmark's results name: quality-<split>, with -dev for ``--eval_split dev``."""
    return f"quality-{cfg['tasks'].split}" + ("-dev" if bench.eval_split == "dev" else "")


def comparison_out_dir(bench: BenchArgs) -> Path:
    """``--out_dir``, else benchmarks/results (runs/quality-quick with --quick: a smoke run
    never overwrites committed results)."""
    return Path(bench.out_dir or ("runs/quality-quick" if bench.quick else "benchmarks/results"))


def comparison_work_dir(bench: BenchArgs, cfg: dict) -> Path:
    """``--work_dir``, else the quality benchmark's test-run folder ``runs/quality-<split>``
    (``-quick`` with --quick): the tuning scripts work there too, so the test run reuses the
    priors they train and the results they cache."""
    return Path(bench.work_dir or f"runs/quality-{cfg['tasks'].split}" + ("-quick" if bench.quick else ""))


# -- tasks ---------------------------------------------------------------------------------------


def resolve_tasks(bench: BenchArgs, cfg: dict, need_train: bool) -> tuple[list[str], list[str], list[str]]:
    """(held-out tasks, meta-train tasks, notes): the explicit lists or the split's, keeping
    the tasks whose files the data layer reads; each task left out is named in a note."""
    tasks, notes = cfg["tasks"], []
    split = load_split(tasks.split, tasks.data_dir) if not (tasks.train_tasks and tasks.test_tasks) else {}
    held = list(tasks.test_tasks or split.get("test", []))
    held_tasks = replace(tasks, k=test_k(bench, cfg))
    held_out = usable_tasks(held, held_tasks, bench.seeds, bench.eval_split, notes, "held-out", max_options=None)
    others = [t for t in split.get("test", []) if t not in held] if tasks.test_tasks and bench.eval_split == "test" else []
    if others:
        why: list[str] = []
        usable = usable_tasks(others, held_tasks, bench.seeds, "test", why, "held-out", max_options=None)
        notes.extend(n.replace("held-out:", "held-out (not chosen):") for n in why)
        if usable:
            notes.append(f"held-out: usable test tasks of the split not run (--test_tasks): {', '.join(usable)}")
    if bench.max_test_tasks:
        held_out = held_out[: bench.max_test_tasks]
    train: list[str] = []
    if need_train:
        names = list(tasks.train_tasks or split.get("train", []))
        if tasks.val_tasks:
            names = [t for t in names if t not in tasks.val_tasks]
            notes.append(
                f"meta-validation: {', '.join(tasks.val_tasks)} held out of meta-training (train file = "
                f"support, dev file = query, seeds {list(bench.val_seeds)})"
            )
        if bench.eval_split == "dev":
            dropped = [t for t in names if t in held_out]
            names = [t for t in names if t not in held_out]
            if dropped:
                notes.append(f"dev tuning: {', '.join(dropped)} held out of meta-training (their dev files are the query sets)")
        train = usable_tasks(names, tasks, tasks.data_seeds, "dev", notes, "meta-train", bench.max_options)
        if bench.max_train_tasks and len(train) > bench.max_train_tasks:
            notes.append(f"meta-train tasks capped at {bench.max_train_tasks} (--max_train_tasks) of {len(train)} usable")
            train = train[: bench.max_train_tasks]
        if not train:
            raise SystemExit("no usable meta-train task (see the notes above)")
    if not held_out:
        raise SystemExit("no usable held-out task")
    if bench.eval_split == "test" and set(held_out) & set(train):
        raise SystemExit(f"held-out tasks also in meta-training: {sorted(set(held_out) & set(train))}")
    for n in notes:
        print(f"note: {n}")
    return held_out, train, notes


def usable_tasks(
    names: list[str], tasks, seeds, query_split: str, notes: list[str], role: str, max_options: int | None
) -> list[str]:
    """The tasks of ``names`` whose k-shot episodes load for every seed (support = train file,
    query = ``query_split``), have options, and at most ``max_options`` of them per example;
    each one left out is named with why in ``notes`` (as "<role>: <task> skipped: ...")."""
    root = resolve_data_dir(tasks.data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        present = check_tasks(names, root, skip_missing=True) if names else []
    missing = [t for t in names if t not in present]
    if missing:
        notes.append(f"{role}: {len(missing)} task(s) of the split absent from the data: {', '.join(missing)}")
    out = []
    for task in present:
        try:
            if (root / "task_meta" / f"{task}.json").is_file() and task_meta(task, root)["task_type"] == "free-form":
                notes.append(f"{role}: {task} skipped: free-form (no options)")
                continue
            n_options = 0
            for seed in seeds:
                ep = load_episode(task, tasks.k, seed, query_split, 1, root)
                n_options = max([n_options] + [len(e.options) for e in ep.support + ep.query])
        except DataError as err:  # MissingTaskError (no test file) included
            notes.append(f"{role}: {task} skipped: {str(err).splitlines()[0][:300]}")
            continue
        if max_options is not None and n_options > max_options:
            notes.append(f"{role}: {task} skipped: {n_options} options per example > --max_options {max_options}")
            continue
        out.append(task)
    return out


def task_stats(task: str, seeds, bench: BenchArgs, cfg: dict, tokenizer) -> dict:
    """Chance rate (mean 1 / number of options), majority-class rate (share of the most
    frequent answer index) and the macro-F1 of always predicting it, of the evaluated
    examples, averaged over seeds; and ``truncation``, how many support and query inputs
    over all seeds were cut from the left to fit ``max_length``
    (:func:`abmll.scoring.merge_truncation` of each seed's :func:`~abmll.scoring.truncation_summary`)."""
    tasks, ev = cfg["tasks"], cfg["eval"]
    per, cut = [], []
    for seed in seeds:
        ep = load_episode(task, test_k(bench, cfg), seed, bench.eval_split, ev.max_test, tasks.data_dir)
        cut.append(truncation_summary(make_batches(tokenizer, [*ep.support, *ep.query], cfg["scoring"], ep.support)))
        q = ep.query
        labels = torch.tensor([e.label for e in q])
        width = max(len(e.options) for e in q)
        counts = torch.bincount(labels, minlength=width)
        majority = int(counts.argmax())
        onehot = torch.nn.functional.one_hot(torch.full_like(labels, majority), width).float()
        per.append(
            dict(
                n_test=len(q),
                n_classes=width,
                chance_rate=statistics.fmean(1 / len(e.options) for e in q),
                majority_rate=counts.max().item() / len(q),
                majority_macro_f1=macro_f1(onehot, labels),
            )
        )
    out = {k: statistics.fmean(p[k] for p in per) for k in ("chance_rate", "majority_rate", "majority_macro_f1")}
    return {"n_test": per[0]["n_test"], "n_classes": per[0]["n_classes"], **out, "truncation": merge_truncation(cut)}


# -- model and cache -------------------------------------------------------------------------


def build_tiny_model(folder: Path) -> Path:
    """Save a 2-layer random Llama (hidden 32) with a byte-level tokenizer to ``folder``."""
    if not (folder / "config.json").is_file():
        tiny_llama().save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def build_model(cfg: dict, work: Path) -> tuple[BayesLoraModel, object]:
    m = cfg["model"]
    name = str(build_tiny_model(work / "tiny-model")) if m.model == TINY_MODEL else m.model
    base, tok = load_base_model(name, m.dtype, resolve_device(m.device))
    model = BayesLoraModel(base, cfg["lora"])
    cfg["lora"] = model.config
    return model, tok


def _group(cfg: dict, name: str, keys=None) -> dict:
    kept = group_dict(name, cfg[name])  # fields added since priors and results were cached: only when set
    d = {k: v for k, v in asdict(cfg[name]).items() if k in kept}
    return d if keys is None else {k: d[k] for k in keys}


def prior_config(kind: str, cfg: dict, train: list[str], bench: BenchArgs | None = None) -> dict:
    """What prior ``kind`` depends on (also saved with it and checked on resume): the groups
    but runtime-only fields, the train tasks, and the validation that picks the best prior."""
    cfg = kind_cfg(kind, cfg, bench)
    config = {g: _group(cfg, g) for g in ("model", "lora", "hyperprior", "scoring")}
    config["model"].pop("device")
    config["lora"].pop("frozen_cache_mb")
    config["tasks"] = {**_group(cfg, "tasks", ["split", "k", "data_seeds", "max_query"]), "train_tasks": list(train)}
    config["meta"] = group_dict("meta", prior_meta_config(kind, cfg["meta"]))  # keys of priors trained before kept
    if bench is not None and bench.validate_every:
        config["validation"] = {
            "val_tasks": list(cfg["tasks"].val_tasks),
            "val_seeds": list(bench.val_seeds),
            "every": bench.validate_every,
            "method": ADAPTING_METHOD[kind],
            "test_steps": cfg["eval"].test_steps,
            "eval_samples": cfg["eval"].eval_samples,
        }
        # the validator adapts with the eval group's optimiser and lr: in the key when not the defaults
        config["validation"].update(changed_added_fields("eval", cfg["eval"]))
    return config


PRIOR_ONLY = {f.name for f in fields(MetaConfig) if f.name in OUTER_LOOP} | {"seed"}
"""Meta-config fields used only to train a prior, not by test-time adaptation: the outer-loop
fields the CLI's adapt and evaluate do not take (:data:`abmll.config.OUTER_LOOP`), and the seed
(which ``abmll adapt`` uses, but the benchmark's adaptation is seeded per task and seed)."""


def method_config(name: str, cfg: dict, train: list[str], eval_split: str, bench: BenchArgs | None = None) -> dict:
    """What a result of method ``name`` depends on: the model, adapter shape, scoring, shots
    and evaluated examples; when it adapts, the budget and every meta-config field but the
    meta-training-only ones (:data:`PRIOR_ONLY`; so a field added later counts by default),
    without beta and samples for deterministic LoRA; the prediction samples when it is
    Bayesian; its prior's config when the prior is trained. The optimizer is recorded only
    when it is not SGD, so results cached before it was a setting keep their keys."""
    spec = get_spec(name)
    if spec.calibrate:  # the recipe entry's predictions, tempered
        config = method_config(spec.base, cfg, train, eval_split, bench)
        if spec.calibrate == "dev":
            config["temperature"] = {"fit": "dev", **dev_units(cfg, bench)}
        else:
            config["temperature"] = {"fit": "support", "folds": cfg["eval"].support_folds}
        return config
    ev = cfg["eval"] if bench is None else method_eval(name, cfg, bench)
    model = _group(cfg, "model")
    model.pop("device")
    lora = _group(cfg, "lora")
    lora.pop("frozen_cache_mb")  # a runtime setting: results do not depend on it
    config = {
        "model": model,
        "lora": lora,
        "scoring": _group(cfg, "scoring"),
        "k": cfg["tasks"].k if bench is None else test_k(bench, cfg),
        "max_test": ev.max_test,
        "eval_split": eval_split,
    }
    if spec.adapt:
        adapt_config = {k: v for k, v in _group(cfg, "meta").items() if k not in PRIOR_ONLY}
        if ev.test_lr is not None:
            adapt_config["inner_lr"] = ev.test_lr
        if ev.test_optimizer != "sgd":
            adapt_config["optimizer"] = ev.test_optimizer
        if not spec.bayesian:
            adapt_config.pop("beta"), adapt_config.pop("n_samples")
        config.update(test_steps=ev.test_steps, adapt=adapt_config)
    if spec.samples_draws:
        config.update(eval_samples=cfg["eval"].eval_samples)
    if spec.ensemble:
        config.update(ensemble_members=ev.ensemble_members)
    if spec.mc_dropout:
        config.update(lora_dropout=ev.lora_dropout)
    if spec.laplace:
        config.update(laplace=f"diagonal GGN, prior N(init, 1/lambda), lambda by marginal likelihood, {spec.laplace} predictive")
    if spec.prior != "init":
        config["prior"] = prior_config(spec.prior, cfg, train, bench)
    return config


def prior_folder(kind: str, cfg: dict, train: list[str], bench: BenchArgs, work: Path) -> Path:
    """Where prior ``kind`` is trained under ``work``: named by the hash of :func:`prior_config`."""
    return work / f"prior-{kind}-{config_hash(prior_config(kind, cfg, train, bench))}"


def train_kind(kind: str, model: BayesLoraModel, tok, cfg: dict, train: list[str], bench: BenchArgs, work: Path):
    """Prior ``kind`` (the untrained init for "init"), meta-trained on ``train`` in its
    :func:`prior_folder`: loaded when finished there, resumed when not; with
    ``bench.validate_every``, validated on ``cfg["tasks"].val_tasks`` (adapted as the eval
    group says) and the best prior by validation NLL returned."""
    if kind == "init":
        return model.init_params()
    cfg = kind_cfg(kind, cfg, bench)
    t0 = time.perf_counter()

    def on_step(logs):
        if not logs.get("skipped"):
            print(
                f"  prior {kind} step {logs['step'] + 1}/{cfg['meta'].meta_steps}: query NLL "
                f"{logs['query_nll']:.3f}, support NLL {logs['support_nll_before']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    tasks = cfg["tasks"]
    validator = None
    if bench.validate_every:
        validator = make_validator(
            model, tok, tasks.val_tasks, bench.val_seeds, tasks, cfg["scoring"], cfg["meta"], cfg["eval"], ADAPTING_METHOD[kind]
        )
    theta, _ = train_prior(
        kind,
        model,
        tok,
        train,
        replace(tasks, train_tasks=train, test_tasks=[]),
        cfg["meta"],
        cfg["hyperprior"],
        cfg["scoring"],
        prior_folder(kind, cfg, train, bench, work),
        prior_config(kind, cfg, train, bench),
        bench.save_every,
        on_step,
        validator,
        bench.validate_every,
    )
    return theta


# -- temperatures fitted on the meta-validation tasks' dev data ----------------------------------


def dev_units(cfg: dict, bench: BenchArgs | None) -> dict:
    """The (task, seed) episodes a "dev"-calibrated method fits its temperature on: the
    meta-validation tasks (never test tasks) x ``bench.val_seeds``, query = their dev files."""
    return {"val_tasks": list(cfg["tasks"].val_tasks), "val_seeds": list(bench.val_seeds) if bench else []}


def dev_temperature(
    base: str, model: BayesLoraModel, tok, cfg: dict, train: list[str], bench: BenchArgs, work: Path, prior
) -> dict:
    """The temperature of method ``base``'s predictions fitted on its dev-data predictions on
    every :func:`dev_units` episode (up to ``eval.max_test`` dev examples each), each cached in
    ``work/dev-cache.json`` as it is computed. Returns {"temperature", "nll_before",
    "nll_after" (pooled dev NLL, nats), "examples"}.

    Raises:
        SystemExit: no meta-validation task or seed.
    """
    units = dev_units(cfg, bench)
    if not units["val_tasks"] or not units["val_seeds"]:
        raise SystemExit(f"a temperature fitted on dev data ({base}) needs --val_tasks and --val_seeds")
    cache = Cache(work / "dev-cache.json", {base: method_config(base, cfg, train, "dev", bench)})
    tasks = replace(cfg["tasks"], k=test_k(bench, cfg))
    predictions = []
    for task in units["val_tasks"]:
        for seed in units["val_seeds"]:
            entry = cache.get(base, task, seed)
            if entry is None:
                ep = episode_batches(model, tok, task, seed, tasks, cfg["scoring"], "dev", cfg["eval"].max_test)
                method = make_method(base, prior(get_spec(base).prior), method_eval(base, cfg, bench))
                _, p, y = run_method(model, method, ep, cfg["meta"], seed)
                entry = {"probs": p.tolist(), "labels": y.tolist()}
                cache.put(base, task, seed, entry)
            predictions.append((torch.tensor(entry["probs"]), torch.tensor(entry["labels"])))
    pooled, y = pool_predictions(predictions)
    t = fit_temperature(pooled, y)
    return {
        "temperature": t,
        "nll_before": tempered_nll(pooled, y, 1.0),
        "nll_after": tempered_nll(pooled, y, t),
        "examples": len(y),
    }


# -- the run ----------------------------------------------------------------------------------


def run(
    bench: BenchArgs, cfg: dict, command: str, work: Path, on_partial: Callable[[dict, Cache], None] | None = None
) -> tuple[dict, Cache]:
    """Train the needed priors, run every (method, task, seed) not yet cached, aggregate.
    ``on_partial(results, cache)`` is called after each held-out task but the last with the
    results of the tasks done so far (``complete`` False). Returns (results, cache)."""
    if bench.threads:
        torch.set_num_threads(bench.threads)
    start = time.perf_counter()
    kinds_needed = {get_spec(m).prior for m in bench.methods} - {"init"}
    held_out, train, notes = resolve_tasks(bench, cfg, need_train=bool(kinds_needed))
    print(f"held-out tasks ({len(held_out)}): {', '.join(held_out)}")
    if train:
        print(f"meta-train tasks ({len(train)}): {', '.join(train)}")
    if bench.fresh:
        for old in [work / "cache.json", *work.glob("prior-*")]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    model, tok = build_model(cfg, work)
    tasks = cfg["tasks"]
    bases = [get_spec(m).base for m in bench.methods if get_spec(m).calibrate]
    needed = list(dict.fromkeys([*bench.methods, *bases]))  # a tempered method's base is cached too
    configs = {m: method_config(m, cfg, train, bench.eval_split, bench) for m in needed}
    cache = Cache(work / "cache.json", configs)
    priors = {}
    temperatures = {}  # base -> dev_temperature(base)

    def prior(kind: str):
        if kind not in priors:
            priors[kind] = train_kind(kind, model, tok, cfg, train, bench, work)
        return priors[kind]

    code = code_version()  # once per run: finish() runs after every result

    def finish(done: list[str], complete: bool) -> dict:
        results = aggregate(bench, cfg, cache, done, stats)
        prior_logs = {}
        for kind in prior_kinds(bench.methods):
            path = prior_folder(kind, cfg, train, bench, work) / "history.json" if kind != "init" else None
            if path is not None and path.is_file():
                history = [h for h in json.loads(path.read_text()) if "query_nll" in h]
                prior_logs[kind] = {
                    "meta_steps": len(history),
                    "folder": str(path.parent),
                    "first_query_nll": history[0]["query_nll"] if history else None,
                    "last_query_nll": history[-1]["query_nll"] if history else None,
                    "query_nll_last5": statistics.fmean(h["query_nll"] for h in history[-5:]) if history else None,
                }
                val_path = path.parent / "validation.json"
                if val_path.is_file():
                    validation = json.loads(val_path.read_text())
                    best = min(validation, key=lambda v: v["nll"])
                    untrained = next((v for v in validation if v["step"] == 0), {})
                    prior_logs[kind].update(
                        validation=validation,
                        best_step=best["step"],
                        best_val_nll=best["nll"],
                        best_val_ece=best["ece"],
                        untrained_val_nll=untrained.get("nll"),
                        untrained_val_ece=untrained.get("ece"),
                    )
        adaptation = {
            m: [e.test_optimizer, e.test_steps, e.adapt_lr(cfg["meta"])]
            for m in bench.methods
            if get_spec(m).adapt
            for e in [method_eval(m, cfg, bench)]
        }
        results.update(adaptation=adaptation, test_k=test_k(bench, cfg), dev_temperatures=temperatures)
        results.update(
            command=command,
            complete=complete,
            code=code,
            train_tasks=train,
            notes=notes,
            priors=prior_logs,
            config={**{g: _group(cfg, g) for g in GROUPS}, "bench": asdict(bench)},
            method_configs=cache.hashes,
            seconds_this_run=time.perf_counter() - start,
        )
        return results

    for m in bench.methods:  # read back from dev-cache.json when done before, so the results always record them
        base = get_spec(m).base
        if get_spec(m).calibrate == "dev" and base not in temperatures:
            temperatures[base] = dev_temperature(base, model, tok, cfg, train, bench, work, prior)
    stats = {}
    total = len(held_out) * len(bench.seeds) * len(bench.methods)
    count = 0
    for task in held_out:
        stats[task] = task_stats(task, bench.seeds, bench, cfg, tok)
        for seed in bench.seeds:
            todo = [m for m in bench.methods if cache.get(m, task, seed) is None]
            count += len(bench.methods) - len(todo)
            if not todo:
                continue
            for m in todo:  # priors first: their training does not reseed anything below
                prior(get_spec(m).prior)
            ep = episode_batches(
                model,
                tok,
                task,
                seed,
                replace(tasks, k=test_k(bench, cfg)),
                cfg["scoring"],
                bench.eval_split,
                cfg["eval"].max_test,
                folds=cfg["eval"].support_folds if any(get_spec(m).calibrate == "support" for m in todo) else 0,
            )
            runs = [
                b
                for b in dict.fromkeys(get_spec(m).base for m in todo if get_spec(m).calibrate)
                if cache.get(b, task, seed) is None
            ]
            for m in [*runs, *(m for m in todo if m not in runs)]:  # a tempered method's base first
                t0 = time.perf_counter()
                spec = get_spec(m)
                method = make_method(spec.base if spec.calibrate else m, prior(spec.prior), method_eval(m, cfg, bench))
                if spec.calibrate:  # the base's cached predictions, tempered
                    base = cache.get(spec.base, task, seed)
                    t = (
                        temperatures[spec.base]["temperature"]
                        if spec.calibrate == "dev"
                        else support_temperature(
                            model, replace(method, support_folds=cfg["eval"].support_folds), ep, cfg["meta"], seed
                        )
                    )
                    labels = torch.tensor(base["labels"])
                    probs = apply_temperature(torch.tensor(base["probs"]), t)
                    metrics = {**base["metrics"], **compute_metrics(probs, labels), "temperature": t}
                    extra = {"base_seconds": base["seconds"]}
                else:
                    metrics, probs, labels = run_method(model, method, ep, cfg["meta"], seed)
                    extra = {}
                count += m in bench.methods
                entry = {
                    "metrics": metrics,
                    "probs": probs.tolist(),
                    "labels": labels.tolist(),
                    "n_predicted_classes": int(probs.argmax(1).unique().numel()),
                    "seconds": time.perf_counter() - t0 + extra.get("base_seconds", 0.0),
                    "code": code.get("commit"),
                    **extra,
                }
                cache.put(m, task, seed, entry)
                if m not in bench.methods:
                    continue
                print(
                    f"[{count}/{total}] {m:15s} {task:28s} seed {seed:3d}: acc {metrics['accuracy']:.3f} "
                    f"F1 {metrics['macro_f1']:.3f} ECE {metrics['ece']:.3f} NLL {metrics['nll']:.3f} "
                    f"({entry['seconds']:.0f} s)",
                    flush=True,
                )
        if on_partial is not None and task != held_out[-1]:
            on_partial(finish(held_out[: held_out.index(task) + 1], complete=False), cache)
    return finish(held_out, complete=True), cache


def aggregate(bench: BenchArgs, cfg: dict, cache: Cache, held_out: list[str], stats: dict) -> dict:
    """Per method: means over tasks of the means over seeds, their std over seeds, 95% bootstrap
    intervals over the (task, seed) units, and per task the same with chance and majority rates;
    the paired differences ABMLL minus each baseline with their intervals. Metrics are recomputed
    from the cached predictions, so a changed metric definition needs no re-run."""
    methods, units = {}, {}
    unit_tasks = [t for t in held_out for _ in bench.seeds]  # the cluster of each (task, seed) unit
    for m in bench.methods:
        entries = {t: {s: cache.get(m, t, s) for s in bench.seeds} for t in held_out}
        per = {
            t: {s: compute_metrics(torch.tensor(e["probs"]), torch.tensor(e["labels"])) for s, e in es.items()}
            for t, es in entries.items()
        }
        units[m] = [per[t][s] for t in held_out for s in bench.seeds]
        summ = summarise(per)
        out = {k: summ["mean"][k] for k in METRICS}
        out.update({f"{k}_std": summ["std_over_seeds"][k] for k in METRICS})
        out.update({f"{k}_ci95": list(bootstrap_mean_ci([u[k] for u in units[m]], clusters=unit_tasks)[1:]) for k in METRICS})
        out["per_task"] = {}
        for t in held_out:
            row = {k: summ["per_task"][t]["mean"][k] for k in METRICS}
            row.update({f"{k}_std": statistics.pstdev(per[t][s][k] for s in bench.seeds) for k in METRICS})
            row.update(
                chance_rate=stats[t]["chance_rate"],
                majority_rate=stats[t]["majority_rate"],
                majority_macro_f1=stats[t]["majority_macro_f1"],
                collapsed_seeds=sum(e["n_predicted_classes"] == 1 for e in entries[t].values()),
                seeds={str(s): {**per[t][s], "n_predicted_classes": e["n_predicted_classes"]} for s, e in entries[t].items()},
            )
            out["per_task"][t] = row
        out["seconds_per_task_seed"] = statistics.fmean(e["seconds"] for es in entries.values() for e in es.values())
        methods[m] = out
    paired = {}
    if "abmll" in units:
        for m in bench.methods:
            if m != "abmll":
                paired[m] = {}
                for k in METRICS:
                    mean, lo, hi = bootstrap_mean_ci([a[k] - b[k] for a, b in zip(units["abmll"], units[m])], clusters=unit_tasks)
                    paired[m][k] = {"diff": mean, "ci95": [lo, hi]}
    return {
        "model": cfg["model"].model,
        "split": cfg["tasks"].split,
        "eval_split": bench.eval_split,
        "seeds": list(bench.seeds),
        "tasks": list(held_out),
        "methods": methods,
        "task_stats": stats,
        "paired_abmll_minus": paired,
        "ece_scheme": ECE_SCHEME,
        "intervals": INTERVALS,
        "target": target_check(methods, paired),
    }


def target_check(methods: dict, paired: dict) -> dict:
    """The issue's target: ABMLL mean ECE <= 0.15 and mean macro-F1 >= 0.50; its ECE below every
    baseline's with the paired interval excluding zero; its accuracy and macro-F1 not below any
    baseline's beyond the interval (the paired interval's upper end >= 0)."""
    if "abmll" not in methods or not paired:
        return {}
    a = methods["abmll"]
    checks = {
        name: {
            "ece_lower_significant": d["ece"]["ci95"][1] < 0,
            "accuracy_not_worse": d["accuracy"]["ci95"][1] >= 0,
            "macro_f1_not_worse": d["macro_f1"]["ci95"][1] >= 0,
        }
        for name, d in paired.items()
    }
    absolute = {"ece_at_most_0.15": a["ece"] <= 0.15, "macro_f1_at_least_0.50": a["macro_f1"] >= 0.50}
    met = all(absolute.values()) and all(all(c.values()) for c in checks.values())
    return {"met": met, "absolute": absolute, "vs": checks}


def code_version() -> dict:
    """The git commit of the checkout and whether src/ differs from it (provenance only)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=root).returncode != 0
    except OSError:
        return {}
    return {"commit": commit, "src_modified": dirty}
