"""The benchmarks' statistics and results files: aggregating cached per-unit results into
means, intervals and paired differences (cluster bootstrap over tasks), the target check,
Markdown cells, and writing JSON + Markdown with the command line and code version."""

from __future__ import annotations

import math
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from bench_flags import BenchArgs

from abmll.checkpoint import write_json
from abmll.config import RunConfig
from abmll.evaluate import summarise
from abmll.metrics import ECE_SCHEME, bootstrap_mean_ci, compute_metrics

if TYPE_CHECKING:
    from harness import Cache


RESULTS = Path(__file__).parent / "results"
"""Where committed results live: ``<name>.json`` and ``<name>.md`` per benchmark run."""


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


METRICS = ("accuracy", "macro_f1", "ece", "nll", "brier", "aurc")


def aggregate(bench: BenchArgs, cfg: RunConfig, cache: Cache, held_out: list[str], stats: dict) -> dict:
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
        "model": cfg.model.model,
        "split": cfg.tasks.split,
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
