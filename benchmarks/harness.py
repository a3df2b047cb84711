"""The method comparison of benchmarks/quality.py, tune_adaptation.py and tune_outer.py: each
method's configuration and what its results depend on (:func:`method_config`,
:func:`prior_config`), the meta-trained priors (:func:`train_kind`), the dev temperatures, and
the run with its result :class:`Cache` keyed by configuration hash (:func:`run`).

Around it: the flags and presets in :mod:`bench_flags` (:class:`BenchArgs`, the SmolLM2
defaults of src/abmll/demo.yaml, the --quick preset, every script's entry ``parse``), the
split's usable tasks in :mod:`bench_tasks`, and the statistics and results files in
:mod:`bench_report` (means, 95% cluster-bootstrap intervals, paired differences, JSON +
Markdown in benchmarks/results/). The tiny random model of smoke runs is
:mod:`abmll.testing`'s, shared with the test suite."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from bench_flags import GROUPS, TINY_MODEL, BenchArgs, kind_cfg, method_eval, test_k
from bench_report import aggregate, code_version
from bench_tasks import resolve_tasks, task_stats

from abmll.bayes_lora import BayesLoraModel
from abmll.checkpoint import write_json
from abmll.config import RunConfig, changed_added_fields, group_dict, key_dict, result_config
from abmll.evaluate import Result, evaluate
from abmll.meta import MetaConfig
from abmll.methods import ADAPTING_METHOD, get_spec, make_method, prior_kinds, prior_meta_config, train_prior
from abmll.metrics import compute_metrics
from abmll.models import load_base_model, resolve_device
from abmll.outputs import settings_hash
from abmll.plots import pool_predictions
from abmll.roles import OUTER, names
from abmll.temperature import fit_temperature, tempered_nll
from abmll.testing import tiny_llama, tiny_tokenizer
from abmll.validation import make_validator


def config_hash(config: dict) -> str:
    """The key of a result or prior: :func:`abmll.outputs.settings_hash` of ``config``, SHA-1,
    10 hex digits (the form every committed cache and prior folder is named by)."""
    return settings_hash(config, "sha1", 10)


class Cache:
    """(method, task, seed, config hash) -> {"metrics", "probs", "labels", ...}, in one JSON
    file (one line) rewritten atomically after each result. The hash is of the config the method's
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
        write_json(self.path, {"results": self.results}, indent=None)  # rewritten after every result: compact


class CachedResults(Mapping):
    """A :class:`Cache` as :func:`abmll.evaluate.evaluate`'s ``done``: (method, task, seed) ->
    :class:`abmll.evaluate.Result` (metrics computed from the predictions for entries that
    keep only those, as the dev cache's do)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def __getitem__(self, key: tuple[str, str, int]) -> Result:
        entry = self.cache.get(*key)
        if entry is None:
            raise KeyError(key)
        probs, labels = torch.tensor(entry["probs"]), torch.tensor(entry["labels"])
        return Result(entry.get("metrics") or compute_metrics(probs, labels), probs, labels, entry.get("seconds", 0.0))

    def __contains__(self, key) -> bool:
        return self.cache.get(*key) is not None

    def __iter__(self):
        for key in self.cache.results:
            method, task, seed, digest = key.split("|")
            if self.cache.hashes.get(method) == digest:
                yield method, task, int(seed)

    def __len__(self) -> int:
        return sum(1 for _ in self)


# -- model --------------------------------------------------------------------------------------


def build_tiny_model(folder: Path) -> Path:
    """Save a 2-layer random Llama (hidden 32) with a byte-level tokenizer to ``folder``."""
    if not (folder / "config.json").is_file():
        tiny_llama().save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def build_model(cfg: RunConfig, work: Path) -> tuple[BayesLoraModel, object]:
    m = cfg.model
    name = str(build_tiny_model(work / "tiny-model")) if m.model == TINY_MODEL else m.model
    base, tok = load_base_model(name, m.dtype, resolve_device(m.device))
    model = BayesLoraModel(base, cfg.lora)
    cfg.lora = model.config
    return model, tok


def _group(cfg: RunConfig, name: str) -> dict:
    """Config group ``name`` as recorded in results: without fields added since results were
    cached while at their defaults (:func:`abmll.config.group_dict`)."""
    kept = group_dict(getattr(cfg, name))
    return {k: v for k, v in asdict(getattr(cfg, name)).items() if k in kept}


def _key(cfg: RunConfig, name: str, keys=None) -> dict:
    """Config group ``name`` as it enters a key (:func:`abmll.config.result_config`: without
    machine fields and added fields at their defaults), kept to ``keys`` when given."""
    d = result_config(cfg.only(name))[name]
    return d if keys is None else {k: d[k] for k in keys}


def prior_config(kind: str, cfg: RunConfig, train: list[str], bench: BenchArgs | None = None) -> dict:
    """What prior ``kind`` depends on (also saved with it and checked on resume): the groups
    but runtime-only fields, the train tasks, and the validation that picks the best prior."""
    cfg = kind_cfg(kind, cfg, bench)
    config = {g: _key(cfg, g) for g in ("model", "lora", "hyperprior", "scoring")}
    config["tasks"] = {**_key(cfg, "tasks", ["split", "k", "data_seeds", "max_query"]), "train_tasks": list(train)}
    config["meta"] = key_dict(prior_meta_config(kind, cfg.meta))
    if bench is not None and bench.validate_every:
        config["validation"] = {
            "val_tasks": list(cfg.tasks.val_tasks),
            "val_seeds": list(bench.val_seeds),
            "every": bench.validate_every,
            "method": ADAPTING_METHOD[kind],
            "test_steps": cfg.eval.test_steps,
            "eval_samples": cfg.eval.eval_samples,
        }
        # the validator adapts with the eval group's optimiser and lr: in the key when not the defaults
        config["validation"].update(changed_added_fields(cfg.eval))
    return config


def method_config(name: str, cfg: RunConfig, train: list[str], eval_split: str, bench: BenchArgs | None = None) -> dict:
    """What a result of method ``name`` depends on: the model, adapter shape, scoring, shots
    and evaluated examples; when it adapts, the budget and every meta-config field but the
    meta-training-only ones (role OUTER; so a field added later counts by default) and the
    seed (the benchmark seeds each (task, seed) itself),
    without beta and samples for deterministic LoRA; the prediction samples when it is
    Bayesian; its prior's config when the prior is trained. The optimizer is recorded only
    when it is not SGD, so results cached before it was a setting keep their keys."""
    spec = get_spec(name)
    if spec.calibrate:  # the recipe entry's predictions, tempered
        config = method_config(spec.base, cfg, train, eval_split, bench)
        if spec.calibrate == "dev":
            config["temperature"] = {"fit": "dev", **dev_units(cfg, bench)}
        else:
            config["temperature"] = {"fit": "support", "folds": cfg.eval.support_folds}
        return config
    ev = cfg.eval if bench is None else method_eval(name, cfg, bench)
    config = {
        "model": _key(cfg, "model"),
        "lora": _key(cfg, "lora"),
        "scoring": _key(cfg, "scoring"),
        "k": cfg.tasks.k if bench is None else test_k(bench, cfg),
        "max_test": ev.max_test,
        "eval_split": eval_split,
    }
    if spec.adapt:
        outer = {*names(MetaConfig, OUTER), "seed"}
        adapt_config = {k: v for k, v in _key(cfg, "meta").items() if k not in outer}
        if ev.test_lr is not None:
            adapt_config["inner_lr"] = ev.test_lr
        if ev.test_optimizer != "sgd":
            adapt_config["optimizer"] = ev.test_optimizer
        if not spec.bayesian:
            adapt_config.pop("beta"), adapt_config.pop("n_samples")
        config.update(test_steps=ev.test_steps, adapt=adapt_config)
    if spec.samples_draws:
        config.update(eval_samples=cfg.eval.eval_samples)
    if spec.ensemble:
        config.update(ensemble_members=ev.ensemble_members)
    if spec.mc_dropout:
        config.update(lora_dropout=ev.lora_dropout)
    if spec.laplace:
        config.update(laplace=f"diagonal GGN, prior N(init, 1/lambda), lambda by marginal likelihood, {spec.laplace} predictive")
    if spec.prior != "init":
        config["prior"] = prior_config(spec.prior, cfg, train, bench)
    return config


def prior_folder(kind: str, cfg: RunConfig, train: list[str], bench: BenchArgs, work: Path) -> Path:
    """Where prior ``kind`` is trained under ``work``: named by the hash of :func:`prior_config`."""
    return work / f"prior-{kind}-{config_hash(prior_config(kind, cfg, train, bench))}"


def train_kind(kind: str, model: BayesLoraModel, tok, cfg: RunConfig, train: list[str], bench: BenchArgs, work: Path):
    """Prior ``kind`` (the untrained init for "init"), meta-trained on ``train`` in its
    :func:`prior_folder`: loaded when finished there, resumed when not; with
    ``bench.validate_every``, validated on ``cfg.tasks.val_tasks`` (adapted as the eval
    group says) and the best prior by validation NLL returned."""
    if kind == "init":
        return model.init_params()
    cfg = kind_cfg(kind, cfg, bench)
    t0 = time.perf_counter()

    def on_step(logs):
        if not logs.get("skipped"):
            print(
                f"  prior {kind} step {logs['step'] + 1}/{cfg.meta.meta_steps}: query NLL "
                f"{logs['query_nll']:.3f}, support NLL {logs['support_nll_before']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    tasks = cfg.tasks
    validator = None
    if bench.validate_every:
        validator = make_validator(
            model, tok, tasks.val_tasks, bench.val_seeds, tasks, cfg.scoring, cfg.meta, cfg.eval, ADAPTING_METHOD[kind]
        )
    theta, _ = train_prior(
        kind,
        model,
        tok,
        train,
        replace(tasks, train_tasks=train, test_tasks=[]),
        cfg.meta,
        cfg.hyperprior,
        cfg.scoring,
        prior_folder(kind, cfg, train, bench, work),
        prior_config(kind, cfg, train, bench),
        bench.save_every,
        on_step,
        validator,
        bench.validate_every,
    )
    return theta


# -- temperatures fitted on the meta-validation tasks' dev data ----------------------------------


def dev_units(cfg: RunConfig, bench: BenchArgs | None) -> dict:
    """The (task, seed) episodes a "dev"-calibrated method fits its temperature on: the
    meta-validation tasks (never test tasks) x ``bench.val_seeds``, query = their dev files."""
    return {"val_tasks": list(cfg.tasks.val_tasks), "val_seeds": list(bench.val_seeds) if bench else []}


def dev_temperature(
    base: str, model: BayesLoraModel, tok, cfg: RunConfig, train: list[str], bench: BenchArgs, work: Path, prior
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
    method = make_method(base, partial(prior, get_spec(base).prior), method_eval(base, cfg, bench))
    predictions = []

    def keep(name: str, task: str, seed: int, result: Result, cached: bool) -> None:
        if not cached:
            cache.put(base, task, seed, {"probs": result.probs.tolist(), "labels": result.labels.tolist()})
        predictions.append((result.probs, result.labels))

    tasks = replace(cfg.tasks, k=test_k(bench, cfg))
    evaluate(
        model,
        tok,
        [method],
        units["val_tasks"],
        units["val_seeds"],
        tasks,
        cfg.scoring,
        cfg.meta,
        cfg.eval,
        keep,
        query_split="dev",
        done=CachedResults(cache),
    )
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
    bench: BenchArgs, cfg: RunConfig, command: str, work: Path, on_partial: Callable[[dict, Cache], None] | None = None
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
            m: [e.test_optimizer, e.test_steps, e.adapt_lr(cfg.meta)]
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

    def store(name: str, task: str, seed: int, result: Result, cached: bool) -> None:
        nonlocal count
        count += name in bench.methods
        if cached:
            return
        spec = get_spec(name)
        extra = {"base_seconds": cache.get(spec.base, task, seed)["seconds"]} if spec.calibrate else {}
        entry = {
            "metrics": result.metrics,
            "probs": result.probs.tolist(),
            "labels": result.labels.tolist(),
            "n_predicted_classes": int(result.probs.argmax(1).unique().numel()),
            "seconds": result.seconds,
            "code": code.get("commit"),
            **extra,
        }
        cache.put(name, task, seed, entry)
        if name in bench.methods:
            m = result.metrics
            print(
                f"[{count}/{total}] {name:15s} {task:28s} seed {seed:3d}: acc {m['accuracy']:.3f} "
                f"F1 {m['macro_f1']:.3f} ECE {m['ece']:.3f} NLL {m['nll']:.3f} ({result.seconds:.0f} s)",
                flush=True,
            )

    order = [*(m for m in needed if m in bases), *(m for m in needed if m not in bases)]  # a tempered method's base first
    methods = []
    for m in order:
        spec = get_spec(m)
        temperature = temperatures[spec.base]["temperature"] if spec.calibrate == "dev" else None
        methods.append(make_method(m, partial(prior, spec.prior), method_eval(m, cfg, bench), temperature))
    tasks = replace(cfg.tasks, k=test_k(bench, cfg))
    for task in held_out:
        stats[task] = task_stats(task, bench.seeds, bench, cfg, tok)
        evaluate(
            model,
            tok,
            methods,
            [task],
            bench.seeds,
            tasks,
            cfg.scoring,
            cfg.meta,
            cfg.eval,
            store,
            query_split=bench.eval_split,
            done=CachedResults(cache),
        )
        if on_partial is not None and task != held_out[-1]:
            on_partial(finish(held_out[: held_out.index(task) + 1], complete=False), cache)
    return finish(held_out, complete=True), cache
