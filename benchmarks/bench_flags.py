"""The benchmarks' flags and presets: :class:`BenchArgs` (the flags beside the library's config
groups), parsing them with the SmolLM2 defaults or the quick preset, and what they set per
method and prior kind (adaptation recipes, outer-loop points, output folders)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from abmll.args import config_file_defaults, parse_dataclasses
from abmll.config import CONFIG_GROUPS, DATA_SEEDS, DEMO_CONFIG, RunConfig
from abmll.methods import METHODS, get_spec


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
    """(BenchArgs, RunConfig, *one instance of each ``extra`` dataclass: the flags of
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
    extras, cfg = parsed[: len(extra)], RunConfig(**dict(zip(GROUPS, parsed[len(extra) :])))
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


def method_eval(name: str, cfg: RunConfig, bench: BenchArgs):
    """The eval config method ``name`` adapts with: --adaptation's entry for it, else that of
    the entry whose recipe it uses (``MethodSpec.recipe``), else the group's.

    Raises:
        ValueError: an optimizer, step count or learning rate the config refuses.
    """
    ev = cfg.eval
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


def kind_cfg(kind: str, cfg: RunConfig, bench: BenchArgs | None) -> RunConfig:
    """``cfg`` with the meta group prior ``kind`` trains with: ``--outer``'s settings for it,
    else ``cfg`` itself.

    Raises:
        ValueError: a value the meta config refuses (e.g. a negative learning rate).
    """
    how = None if bench is None else outer_settings(bench).get(kind)
    return cfg if how is None else replace(cfg, meta=replace(cfg.meta, **how))


def test_k(bench: BenchArgs, cfg: RunConfig) -> int:
    """Shots of the held-out support sets (``--test_k``, default the meta-training ``--k``)."""
    return bench.test_k or cfg.tasks.k


def smollm2_defaults(classes) -> dict:
    """The benchmark's SmolLM2 defaults: src/abmll/demo.yaml without :data:`DEMO_ONLY`, with
    :data:`BENCHMARK_OVERRIDES`."""
    return {**_yaml_defaults(str(DEMO_CONFIG), classes, drop=DEMO_ONLY), **BENCHMARK_OVERRIDES}


def _yaml_defaults(path: str, classes, drop=()) -> dict:
    """:func:`abmll.args.config_file_defaults` of ``path`` for the script's ``classes`` (a
    ``bench:`` section holds :class:`BenchArgs`), without the keys in ``drop``.

    Raises:
        SystemExit: the file's error, naming it.
    """
    try:
        flat = config_file_defaults(path, classes, sections={"bench": BenchArgs})
    except ValueError as err:
        raise SystemExit(str(err)) from None
    return {k: v for k, v in flat.items() if k not in drop}


def stem(bench: BenchArgs, cfg: RunConfig) -> str:
    """The quality benchmark's results name: quality-<split>, with -dev for ``--eval_split dev``."""
    return f"quality-{cfg.tasks.split}" + ("-dev" if bench.eval_split == "dev" else "")


def comparison_out_dir(bench: BenchArgs) -> Path:
    """``--out_dir``, else benchmarks/results (runs/quality-quick with --quick: a smoke run
    never overwrites committed results)."""
    return Path(bench.out_dir or ("runs/quality-quick" if bench.quick else "benchmarks/results"))


def comparison_work_dir(bench: BenchArgs, cfg: RunConfig) -> Path:
    """``--work_dir``, else the quality benchmark's test-run folder ``runs/quality-<split>``
    (``-quick`` with --quick): the tuning scripts work there too, so the test run reuses the
    priors they train and the results they cache."""
    return Path(bench.work_dir or f"runs/quality-{cfg.tasks.split}" + ("-quick" if bench.quick else ""))
