"""``abmll evaluate``: zero-shot and the prior's ABMLL (and other priors) on held-out tasks."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from abmll.args import ReportArgs, RunArgs
from abmll.checkpoint import write_json
from abmll.config import EvalArgs, RunConfig, TaskArgs, result_config
from abmll.data import check_task_files, resolve_data_dir
from abmll.evaluate import Method, Result, evaluate_with_predictions, format_table
from abmll.loading import fitting_prior
from abmll.methods import get_spec, make_method
from abmll.metrics import ECE_SCHEME
from abmll.ood import format_ood_table, ood_table
from abmll.outputs import ResultLog, check_writable, file_digest, settings_hash, tensor_digest
from abmll.plots import plot_reliability_per_method
from abmll.priors import resolve_adapter
from abmll.train import task_names

RESULTS, PARTIAL_RESULTS = "results.json", "results.partial.jsonl"


def check_evaluate_inputs(run: RunArgs, cfg: RunConfig) -> list[str]:
    """What ``evaluate`` needs, checked before any model is loaded: every test task's files
    (support and test, every data seed), the output folder, and that ``results.json`` there
    is not replaced without ``--overwrite``. Returns the test task names.

    Raises:
        DataError: a task file problem (file and line). ValueError: ``--out`` unwritable or
            holding results.
    """
    tasks: TaskArgs = cfg.tasks
    names = task_names(tasks, "test")
    check_task_files(names, ("train", "test"), tasks.k, tasks.data_seeds, tasks.data_dir)
    check_task_files(cfg.eval.ood_tasks, ("test",), tasks.k, tasks.data_seeds, tasks.data_dir)
    check_writable(run.out)
    if (Path(run.out) / RESULTS).is_file() and not run.overwrite:
        raise ValueError(f"--out {run.out} already holds {RESULTS}; pass --overwrite to replace it or choose another --out")
    for name in cfg.eval.compare_priors:
        resolve_adapter(name)  # a missing prior is named before the model loads
    return names


def task_files_digest(names: list[str], tasks: TaskArgs) -> str:
    """A hash of the contents of every file of the tasks ``names`` (an edited file changes it)."""
    root = resolve_data_dir(tasks.data_dir)
    return file_digest(sorted(p for name in names for p in (root / name).glob("*.jsonl")))


def check_cli_methods(names: list[str]) -> None:
    """Raises ValueError unless every name is a registry method ``abmll evaluate`` can run:
    one whose prior is the untrained init or the evaluated ABMLL prior, without a temperature
    fitted on meta-validation data (those are run by benchmarks/quality.py)."""
    if not names:
        raise ValueError("--methods needs at least one method")
    for name in names:
        try:
            spec = get_spec(name)
        except ValueError as err:
            raise ValueError(f"--methods: {err}") from None
        need = (
            f"a {spec.prior} prior"
            if spec.prior not in ("init", "abmll")
            else "a temperature fitted on meta-validation dev data"
            if spec.calibrate == "dev"
            else None
        )
        if need:
            raise ValueError(
                f"--methods {name} needs {need}, which abmll evaluate does not make: run benchmarks/quality.py --methods {name}"
            )


def run_evaluate(
    run: RunArgs,
    cfg: RunConfig,
    model,
    tokenizer,
    theta,
    report: ReportArgs | None = None,
    writer=None,
    prior: dict | None = None,
    methods: list[str] = ("zero_shot", "abmll"),
) -> dict:
    """Evaluate ``methods`` (registry names; :func:`check_cli_methods`) on the split's test
    tasks, ABMLL's from ``theta``; print and save the results (results.json with the resolved
    config, and one reliability diagram per method pooled over tasks and seeds unless
    ``report.plots`` is False). ``prior``: the prior's :func:`abmll.priors.prior_status`,
    recorded in the results.

    Each (method, task, seed) result is appended to ``results.partial.jsonl`` as it finishes;
    run again with the same settings, the command computes only the missing ones."""
    names = check_evaluate_inputs(run, cfg)
    tasks: TaskArgs = cfg.tasks
    ev: EvalArgs = cfg.eval
    adapting = dict(steps=ev.test_steps, samples=ev.eval_samples, lr=ev.test_lr, optimizer=ev.test_optimizer)
    check_cli_methods(list(methods))
    methods = [make_method(n, theta if get_spec(n).prior == "abmll" else model.init_params(), ev) for n in methods]
    statuses = {"abmll": prior}
    for name in ev.compare_priors:
        tensors, statuses[f"prior:{Path(name).name}"] = fitting_prior(name, model)
        methods.append(Method(f"prior:{Path(name).name}", tensors, **adapting))
    settings = settings_hash(
        {
            "config": result_config(cfg),
            "names": names,
            "data": task_files_digest([*names, *ev.ood_tasks], tasks),
            "methods": {m.name: tensor_digest(m.prior) for m in methods},
        }
    )
    log = ResultLog(Path(run.out) / PARTIAL_RESULTS, settings, overwrite=run.overwrite)
    if run.overwrite:  # the previous finished results and their plots go
        (Path(run.out) / RESULTS).unlink(missing_ok=True)
        for old in Path(run.out).glob("reliability_*.png"):
            old.unlink()
    done = {
        (e["method"], e["task"], e["seed"]): Result(e["metrics"], torch.tensor(e["probs"]), torch.tensor(e["labels"]))
        for e in log.entries
    }
    if done:
        print(f"resuming: {len(done)} result(s) read back from {log.path}")
    bar = tqdm(total=len(names) * len(tasks.data_seeds) * len(methods), desc="evaluate", unit="run")
    running = {m.name: [] for m in methods}

    def on_result(method, task, seed, result, cached):
        if not cached:
            log.append(
                {
                    "method": method,
                    "task": task,
                    "seed": seed,
                    "metrics": result.metrics,
                    "probs": result.probs.tolist(),
                    "labels": result.labels.tolist(),
                }
            )
        running[method].append(result.metrics)
        bar.update(1)
        bar.set_postfix(
            {
                f"{m} acc/nll": f"{sum(r['accuracy'] for r in rs) / len(rs):.3f}/{sum(r['nll'] for r in rs) / len(rs):.3f}"
                for m, rs in running.items()
                if rs
            }
        )

    results, predictions = evaluate_with_predictions(
        model,
        tokenizer,
        methods,
        names,
        tasks.data_seeds,
        tasks,
        cfg.scoring,
        cfg.meta,
        ev,
        on_result,
        done=done,
    )
    bar.close()
    if ev.ood_tasks:
        results["ood"] = ood_table(model, tokenizer, [m for m in methods if m.steps], names, cfg)
        print(format_ood_table(results["ood"]))
    results["config"] = cfg.to_dict()
    results["data_dir_resolved"] = str(resolve_data_dir(tasks.data_dir))
    results["ece_scheme"] = ECE_SCHEME
    if prior is not None:
        results.update(prior=prior, prior_complete=prior["complete"])
    results["priors_complete"] = {m: s["complete"] for m, s in statuses.items() if s is not None}
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
