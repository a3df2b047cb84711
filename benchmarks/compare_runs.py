"""Paired comparison of ``abmll evaluate`` runs that differ in a setting (e.g. ``--eval_samples``
0 against 4, or two priors): one method's mean metrics per run with 95% cluster-bootstrap
intervals, and each run minus the first, paired by (task, seed).

    .venv/bin/python benchmarks/compare_runs.py --runs runs/A runs/B --name NAME [--method abmll]

Reads ``<run>/results.json`` of each run (or a results file itself: a quality benchmark's
JSON has the same per-task layout); they must cover the same tasks and seeds. Writes
benchmarks/results/NAME.{json,md}, naming the settings in which the runs differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import bench_flags
import bench_report

from abmll.config import config_fields
from abmll.metrics import bootstrap_mean_ci
from abmll.roles import default

DEFAULTS = {name: default(f) for name, f in config_fields().items()}
"""Every config field's default, as ``{"group.field": value}``."""
METRICS = ("accuracy", "macro_f1", "ece", "nll", "brier", "aurc", "mean_epistemic")


@dataclass
class CompareArgs:
    """Flags of benchmarks/compare_runs.py.

    Attributes:
        runs: output folders of ``abmll evaluate`` (each holds results.json), or results JSON
            files (e.g. benchmarks/results/quality-*.json), each optionally ``#METHOD`` to
            compare that method of it instead of ``--method`` (e.g. one run's ABMLL against
            another's LoRA); the first is the reference of the paired differences.
        name: results file stem: writes benchmarks/results/<name>.{json,md}.
        method: the method of the results to compare (abmll, zero_shot, prior:<name>).
        labels: a name per run for the tables (default: the settings in which it differs).
    """

    runs: list[str] = field(default_factory=list)
    name: str = ""
    method: str = "abmll"
    labels: list[str] = field(default_factory=list)


def flat(config: dict, prefix: str = "") -> dict:
    """``{"group.field": value}`` of a nested config dict."""
    out = {}
    for k, v in config.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def units(results: dict, method: str, path: Path) -> dict[tuple[str, str], dict]:
    """``{(task, seed): metrics}`` of ``method`` in one run's results.

    Raises:
        SystemExit: the method is not in the run (the message names the file)."""
    if method not in results.get("methods", {}):
        raise SystemExit(f"{path}: no results of method {method!r} (it has {sorted(results.get('methods', {}))})")
    per_task = results["methods"][method]["per_task"]
    return {(t, s): m for t, row in per_task.items() for s, m in row["seeds"].items()}


def compare(runs: list[str], method: str) -> dict:
    """The comparison of ``runs`` (see the module docstring) as a JSON-able dict.

    Raises:
        SystemExit: fewer than 2 runs, a run without results.json, or runs whose (task, seed)
            units differ (named)."""
    if len(runs) < 2:
        raise SystemExit("--runs needs at least 2 abmll evaluate output folders")
    loaded = []
    for run in runs:
        where, _, own = run.partition("#")
        path = Path(where) / "results.json" if Path(where).is_dir() else Path(where)
        if not path.is_file():
            raise SystemExit(f"{path}: not found (an abmll evaluate run that finished writes it)")
        results = json.loads(path.read_text())
        loaded.append((results, units(results, own or method, path)))
    keys = sorted(loaded[0][1])
    for run, (_, u) in zip(runs[1:], loaded[1:]):
        if sorted(u) != keys:
            raise SystemExit(f"{run} and {runs[0]} cover different (task, seed) units: {sorted(set(u) ^ set(keys))[:5]}")
    clusters = [t for t, _ in keys]
    configs = [flat(r["config"]) for r, _ in loaded]
    for run, config in zip(runs, configs):
        config["method"] = run.partition("#")[2] or method
    for config in configs:  # a field a run does not record (added later, at its default) counts as its default
        config.update({k: v for k, v in DEFAULTS.items() if k not in config})
    differ = sorted(k for k in set().union(*configs) if len({json.dumps(c.get(k)) for c in configs}) > 1)
    metrics = [k for k in METRICS if all(k in u[keys[0]] for _, u in loaded)]
    out = {"method": method, "tasks": sorted(set(clusters)), "units": len(keys), "differ_in": differ, "runs": []}
    reference = loaded[0][1]
    for run, config, (results, u) in zip(runs, configs, loaded):
        entry = {"run": run, "settings": {k: config.get(k) for k in differ}, "prior": results.get("prior")}
        for k in metrics:
            mean, lo, hi = bootstrap_mean_ci([u[key][k] for key in keys], clusters=clusters)
            entry[k] = {"mean": mean, "ci95": [lo, hi]}
        if u is not reference:
            entry["minus_first"] = {}
            for k in metrics:
                mean, lo, hi = bootstrap_mean_ci([u[key][k] - reference[key][k] for key in keys], clusters=clusters)
                entry["minus_first"][k] = {"diff": mean, "ci95": [lo, hi]}
        out["runs"].append(entry)
    out["intervals"] = bench_report.INTERVALS
    return out


def markdown(result: dict, command: str, labels: list[str] = ()) -> str:
    """The comparison as a Markdown report; ``labels`` name the runs (default: their settings).

    Raises:
        SystemExit: ``labels`` given, but not one per run."""
    metrics = [k for k in METRICS if k in result["runs"][0]]
    if labels and len(labels) != len(result["runs"]):
        raise SystemExit(f"--labels: {len(labels)} given for {len(result['runs'])} runs")
    label = list(labels) or [
        ", ".join(f"{k}={json.dumps(v)}" for k, v in r["settings"].items()) or r["run"] for r in result["runs"]
    ]
    lines = [
        f"# `abmll evaluate` runs compared: {result['method']}",
        "",
        f"Command: `{command}`",
        "",
        f"{len(result['tasks'])} tasks, {result['units']} (task, seed) units; the runs differ in "
        f"{', '.join(result['differ_in']) or 'no setting'}. {result['intervals']}.",
        "",
        "| run | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, r in zip(label, result["runs"]):
        cells = [
            f"{bench_report.fmt(r[k]['mean'])} [{bench_report.fmt(r[k]['ci95'][0])}, {bench_report.fmt(r[k]['ci95'][1])}]"
            for k in metrics
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired, each run minus the first ({label[0]}):", "", "| run | " + " | ".join(metrics) + " |"]
    lines.append("|---|" + "---|" * len(metrics))
    for name, r in zip(label[1:], result["runs"][1:]):
        d = r["minus_first"]
        cells = [bench_report.diff_cell(d[k]) for k in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (args,) = bench_flags.parse(argv, CompareArgs, script="compare_runs.py", description=__doc__.splitlines()[0])
    if not args.name:
        raise SystemExit("--name is required (results go to benchmarks/results/<name>.{json,md})")
    result = compare(args.runs, args.method)
    command = bench_report.command_line("compare_runs.py", argv)
    result["command"] = command
    report = markdown(result, command, args.labels)
    bench_report.write_results(args.name, result, report)
    print(report)
    return result


if __name__ == "__main__":
    main()
