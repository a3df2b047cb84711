"""Quality benchmark: ABMLL against zero-shot, LoRA, multi-task LoRA, Reptile and Bayesian LoRA
on a split's held-out tasks (docs/method.md, "Baselines" and "Prediction and metrics").

    .venv/bin/python benchmarks/quality.py --split class_to_class [--methods ...] [--seeds ...] [flags]
    .venv/bin/python benchmarks/quality.py --quick          # CI smoke test: tiny random model, < 5 min
    .venv/bin/python benchmarks/quality.py --eval_split dev --test_tasks T1 T2 --sweep beta=1e-7,1e-6

Every method is an entry of :data:`abmll.methods.METHODS` run through
:func:`abmll.evaluate.run_method`: same model, data, LoRA rank and targets, and the same
per-task budget (``--test_steps`` SGD steps at ``--inner_lr`` on the k-shot support set, or
each method's own optimiser, steps and learning rate with ``--adaptation``, chosen on dev
tasks by benchmarks/tune_adaptation.py).
The meta-trained priors (abmll, multitask, reptile) use the same meta-train tasks, episodes,
meta-batch size and number of meta-steps.

Outputs (``<stem>`` = ``quality-<split>``, ``quality-<split>-dev`` with ``--eval_split dev``):

- ``<out_dir>/<stem>.json``: ``{"model", "split", "seeds", "tasks", "command", "methods":
  {name: {"accuracy", "macro_f1", "ece", "nll", "brier", "aurc" (means over tasks of the means over
  seeds), "<metric>_std" (std over seeds of the task-averaged metric), "per_task": {task:
  {metrics, "chance_rate", "majority_rate", "collapsed_seeds", "seeds": {...}}}}},
  "task_stats" (per task: chance and majority rates, and ``truncation``, the support and query
  inputs cut to fit ``max_length``), "train_tasks", "notes", "target", "config", "priors"}``;
- ``<out_dir>/<stem>.md``: the same as Markdown tables (macro-F1 a headline column, each
  task with its chance and majority-class rates; collapse to one class is marked);
- ``<out_dir>/<stem>/risk_coverage.png``: accuracy against coverage when each method abstains
  on its most uncertain (highest-entropy) examples first, predictions pooled;
- ``<out_dir>/<stem>/reliability_<method>.png``: one reliability diagram per method, its
  predictions pooled over tasks and seeds.

Resumable: the priors are saved (and resumed) in ``<work_dir>/prior-<kind>-<config hash>``
and each (method, task, seed) result, predictions included, is cached in
``<work_dir>/cache.json`` as it finishes, keyed by a hash of the settings that result depends
on; running a command again computes only what is missing, and a changed setting recomputes
only the methods it affects (``--fresh`` discards the cache and the priors).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import fields, replace
from pathlib import Path

import bench_flags
import torch
from bench_flags import GROUPS, BenchArgs, parse_bench, stem
from bench_report import METRICS, command_line, diff_cell, fmt, write_results
from harness import Cache, run

from abmll.checkpoint import write_json
from abmll.config import CONFIG_GROUPS, RunConfig
from abmll.metrics import plot_reliability_diagram
from abmll.plots import RISK_COVERAGE, plot_risk_coverage, plot_validation_curve, pool_predictions

# -- outputs ----------------------------------------------------------------------------------


def write_outputs(results: dict, bench: BenchArgs, cfg: RunConfig, cache: Cache | None, out_dir: Path, name: str) -> None:
    write_results(name, results, markdown(results, cfg), out_dir)
    print(f"results: {out_dir / (name + '.json')}, {out_dir / (name + '.md')}")
    if bench.plots:
        for kind, p in results.get("priors", {}).items():
            if p.get("validation"):
                path = plot_validation_curve(p["validation"], out_dir / name / f"validation_{kind}.png", title=kind)
                print(f"validation curve ({kind}): {path}")
    if bench.plots and cache is not None:
        predictions = {}
        for m in results["methods"]:
            predictions[m] = [
                (torch.tensor(e["probs"]), torch.tensor(e["labels"]))
                for t in results["tasks"]
                for s in results["seeds"]
                for e in [cache.get(m, t, s)]
            ]
            pooled, labels = pool_predictions(predictions[m])
            path = out_dir / name / f"reliability_{m}.png"
            plot_reliability_diagram(
                pooled, labels, path, title=f"{m} ({len(results['tasks'])} tasks x {len(results['seeds'])} seeds)"
            )
            print(f"reliability diagram ({m}): {path}")
        path = plot_risk_coverage(
            predictions,
            out_dir / name / RISK_COVERAGE,
            title=f"selective prediction, {len(results['tasks'])} tasks x {len(results['seeds'])} seeds",
        )
        print(f"risk-coverage curves: {path}")


def adaptation_text(results: dict, cfg: RunConfig) -> str:
    """The adaptation settings of the results' methods, e.g. "5 SGD steps at lr 0.3 for every method"."""
    ev, meta = cfg.eval, cfg.meta
    default = (ev.test_optimizer, ev.test_steps, ev.adapt_lr(meta))
    per = {m: tuple(a) for m, a in results.get("adaptation", {}).items()}
    fmt = lambda o, n, lr: f"{n} {o.upper() if o == 'sgd' else 'AdamW'} steps at lr {lr:g}"  # noqa: E731
    if all(a == default for a in per.values()):
        return fmt(*default) + " for every method"
    return "; ".join(f"{m} {fmt(*a)}" for m, a in per.items())


def outer_text(meta, results: dict) -> str:
    """The priors' outer loop, e.g. "outer lr 0.001" or "outer lr 0.001, warm-up 25 steps,
    meta-gradient clip 1.0 (reptile 0.003:25:1.0)" with per-kind ``--outer`` settings."""
    text = f"outer lr {meta.outer_lr}"
    text += f", warm-up {meta.outer_warmup_steps} steps" if meta.outer_warmup_steps else ""
    text += f", meta-gradient clip {meta.outer_grad_clip}" if meta.outer_grad_clip else ""
    per_kind = results.get("config", {}).get("bench", {}).get("outer")
    return text + (f" ({', '.join(e.replace('=', ' ') for e in per_kind)}, as LR:WARMUP:CLIP)" if per_kind else "")


def markdown(results: dict, cfg: RunConfig) -> str:
    methods = list(results["methods"])
    ev, meta, tasks = cfg.eval, cfg.meta, cfg.tasks
    lines = [
        f"# Quality benchmark: {results['split']} ({results['eval_split']} data)",
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        *(
            []
            if results.get("complete", True)
            else [f"**Partial results: the {len(results['tasks'])} task(s) done so far; the run continues.**", ""]
        ),
        f"Model {results['model']}; LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}; "
        f"k = {results.get('test_k', tasks.k)} shots; adaptation {adaptation_text(results, cfg)}; "
        f"up to {ev.max_test} {results['eval_split']} examples per task and seed; seeds {results['seeds']}; "
        f"{ev.eval_samples} weight samples in prediction (bayes_lora, abmll). "
        + (
            f"Meta-training: {meta.meta_steps} meta-steps, B = {meta.meta_batch_size}, K = {meta.inner_steps}, "
            f"{outer_text(meta, results)}, beta {meta.beta}, gamma {meta.gamma}, {meta.n_samples} sample(s), on "
            f"{len(results['train_tasks'])} tasks."
            if results.get("train_tasks")
            else "No prior is meta-trained in this run."
        ),
        "",
        "## Mean over tasks [95% bootstrap interval, tasks resampled with their seeds]",
        "",
        f"ECE: {results.get('ece_scheme', {}).get('n_bins', 15)} "
        f"{results.get('ece_scheme', {}).get('binning', 'equal_width')} bins, "
        f"{results.get('ece_scheme', {}).get('bins', '')}.",
        "",
        "AURC: area under the risk-coverage curve, abstaining on the highest predictive entropy first (lower is better).",
        "",
        "| method | accuracy | macro-F1 | ECE | NLL | Brier | AURC | s per task x seed |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, k):
        ci = r.get(f"{k}_ci95")
        return fmt(r[k]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else f" ± {fmt(r[f'{k}_std'])}")

    for m in methods:
        r = results["methods"][m]
        lines.append(
            f"| {m} | " + " | ".join(cell(r, k) for k in METRICS) + f" | {r.get('seconds_per_task_seed', float('nan')):.0f} |"
        )
    st = results["task_stats"]
    lines += [
        "",
        f"Reference, mean over tasks: chance {fmt(statistics.fmean(s['chance_rate'] for s in st.values()))}, "
        f"majority class {fmt(statistics.fmean(s['majority_rate'] for s in st.values()))} (accuracy), "
        f"majority-class macro-F1 {fmt(statistics.fmean(s['majority_macro_f1'] for s in st.values()))}.",
        "",
    ]
    if results.get("dev_temperatures"):
        fits = "; ".join(
            f"{b}: T = {fmt(t['temperature'])} (dev NLL {fmt(t['nll_before'])} -> {fmt(t['nll_after'])}, "
            f"{t['examples']} examples)"
            for b, t in results["dev_temperatures"].items()
        )
        lines += [f"Temperatures fitted on the meta-validation tasks' dev data (never test tasks), per base method: {fits}.", ""]
    if all("truncation" in s for s in st.values()):  # recorded since the harness counts cut inputs
        lines += [truncation_line(st, results["config"]["scoring"]["max_length"]), ""]
    paired = results.get("paired_abmll_minus")
    if paired:
        lines += [
            "## Paired differences, ABMLL minus baseline [95% bootstrap interval, tasks resampled with their seeds]",
            "",
            "| baseline | " + " | ".join(METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        for b, d in paired.items():
            lines.append(f"| {b} | " + " | ".join(diff_cell(d[k]) for k in METRICS) + " |")
        lines.append("")
    target = results.get("target")
    if target and "absolute" in target:
        yn = lambda ok: "yes" if ok else "NO"  # noqa: E731
        lines += [
            "## Target (ABMLL ECE <= 0.15, macro-F1 >= 0.50; ECE below every baseline with the paired "
            "interval excluding 0; accuracy and macro-F1 not below any baseline beyond the interval)",
            "",
            f"Met: **{yn(target['met'])}** (ECE <= 0.15: {yn(target['absolute']['ece_at_most_0.15'])}; "
            f"macro-F1 >= 0.50: {yn(target['absolute']['macro_f1_at_least_0.50'])}).",
            "",
            "| baseline | ECE lower (significant) | accuracy not worse | macro-F1 not worse |",
            "|---|---|---|---|",
        ]
        for b, c in target["vs"].items():
            lines.append(
                f"| {b} | {yn(c['ece_lower_significant'])} | {yn(c['accuracy_not_worse'])} | {yn(c['macro_f1_not_worse'])} |"
            )
        lines.append("")
    for metric, title in (("macro_f1", "macro-F1"), ("accuracy", "accuracy"), ("ece", "ECE")):
        ref = "majority F1" if metric == "macro_f1" else "majority"
        lines += [
            f"## Per task: {title} (mean over seeds; * = predicted a single class on at least one seed)",
            "",
            f"| task | C | n | chance | {ref} | " + " | ".join(methods) + " |",
            "|---|---|---|---|---|" + "---|" * len(methods),
        ]
        for t in results["tasks"]:
            s = st[t]
            refv = s["majority_macro_f1"] if metric == "macro_f1" else s["majority_rate"]
            cells = []
            for m in methods:
                r = results["methods"][m]["per_task"][t]
                cells.append(fmt(r[metric]) + ("*" if r["collapsed_seeds"] else ""))
            lines.append(
                f"| {t} | {s['n_classes']} | {s['n_test']} | {fmt(s['chance_rate'])} | {fmt(refv)} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    if results.get("priors"):
        lines += [
            "## Priors",
            "",
            "| prior | meta-steps | query NLL first -> last step | evaluated prior "
            "| validation NLL untrained -> evaluated | validation ECE untrained -> evaluated |",
            "|---|---|---|---|---|---|",
        ]
        for kind, p in results["priors"].items():
            val = (
                f"best by validation NLL: step {p['best_step']} | {fmt(p['untrained_val_nll'])} -> "
                f"{fmt(p['best_val_nll'])} | {fmt(p['untrained_val_ece'])} -> {fmt(p['best_val_ece'])}"
                if "best_step" in p
                else "last | - | -"
            )
            lines.append(f"| {kind} | {p['meta_steps']} | {fmt(p['first_query_nll'])} -> {fmt(p['last_query_nll'])} | {val} |")
        lines.append("")
    if results.get("train_tasks"):
        lines += [f"Meta-train tasks ({len(results['train_tasks'])}): {', '.join(results['train_tasks'])}.", ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def truncation_line(stats: dict, max_length: int) -> str:
    """One sentence naming each task whose support or query inputs were cut from the left to
    fit ``max_length`` tokens (counts over all seeds), or saying that none was."""
    cut = {t: s["truncation"] for t, s in stats.items() if s["truncation"]["truncated"]}
    if not cut:
        return f"No support or query input was cut to fit max_length={max_length} tokens."
    parts = [
        f"{t} {c['truncated']} of {c['examples']} (on average {c['mean_dropped_fraction']:.0%} of each cut input dropped)"
        for t, c in cut.items()
    ]
    head = f"Inputs cut from the left to fit max_length={max_length} tokens (support and query, all seeds): "
    return head + "; ".join(parts) + "."


# -- sweep ------------------------------------------------------------------------------------


def sweep(bench: BenchArgs, cfg: RunConfig, argv: list[str], out_dir: Path, work: Path, name: str) -> dict:
    """Run once per value of ``bench.sweep`` ("field=v1,v2"); write <name>-sweep-<field>.{json,md}."""
    key, _, values = bench.sweep.partition("=")
    command = command_line("quality.py", argv)
    group = next((g for g in GROUPS if key in {f.name for f in fields(CONFIG_GROUPS[g])}), None)
    if group is None or not values:
        raise SystemExit(f"--sweep takes field=v1,v2,... with a config field, got {bench.sweep!r}")
    kind = type(getattr(getattr(cfg, group), key))
    rows = {}
    for raw in values.split(","):
        value = kind(float(raw)) if kind in (int, float) else kind(raw)
        c = replace(cfg, **{g: replace(v) for g, v in cfg.groups().items()})
        setattr(c, group, replace(getattr(c, group), **{key: value}))
        res, _ = run(bench, c, f"{command}  [{key}={raw}]", work)  # one cache: shared results are reused
        write_json(work / f"sweep-{key}-{raw}.json", res)
        rows[raw] = {
            m: {k: r[k] for k in ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "ece", "ece_std", "nll")}
            for m, r in res["methods"].items()
        }
        rows[raw]["_tasks"], rows[raw]["_train_tasks"] = res["tasks"], res["train_tasks"]
    out = {
        "field": key,
        "split": cfg.tasks.split,
        "eval_split": bench.eval_split,
        "seeds": bench.seeds,
        "command": command,
        "values": rows,
    }
    methods = bench.methods
    lines = [
        f"# Sensitivity to {key} ({bench.eval_split} data, {cfg.tasks.split})",
        "",
        f"Command: `{command}`",
        "",
        f"Held-out {bench.eval_split} tasks: {', '.join(next(iter(rows.values()))['_tasks'])}; seeds {bench.seeds}.",
        "",
        f"| {key} | " + " | ".join(f"{m} acc | {m} macro-F1 | {m} ECE" for m in methods) + " |",
        "|---|" + "---|---|---|" * len(methods),
    ]
    for raw, r in rows.items():
        lines.append(
            f"| {raw} | "
            + " | ".join(
                f"{fmt(r[m]['accuracy'])} ± {fmt(r[m]['accuracy_std'])} | {fmt(r[m]['macro_f1'])} | "
                f"{fmt(r[m]['ece'])} ± {fmt(r[m]['ece_std'])}"
                for m in methods
            )
            + " |"
        )
    write_results(f"{name}-sweep-{key}", out, "\n".join(lines), out_dir)
    print("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench, cfg = parse_bench(argv)
    name = stem(bench, cfg)
    out_dir = bench_flags.comparison_out_dir(bench)
    work = Path(bench.work_dir or f"runs/{name}" + ("-quick" if bench.quick else ""))
    if bench.sweep:
        return sweep(bench, cfg, argv, out_dir, work, name)

    def partial(results: dict, cache: Cache) -> None:
        write_outputs(results, replace(bench, plots=False), cfg, cache, out_dir, name)

    results, cache = run(bench, cfg, command_line("quality.py", argv), work, partial)
    write_outputs(results, bench, cfg, cache, out_dir, name)
    print(markdown(results, cfg))
    return results


if __name__ == "__main__":
    main()
