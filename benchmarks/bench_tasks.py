"""Which tasks a benchmark runs: the split's held-out and meta-train tasks that have every file
and seed needed, and per-task statistics (options, majority class)."""

from __future__ import annotations

import statistics
import warnings
from dataclasses import replace

import torch
from bench_flags import BenchArgs, test_k

from abmll.config import RunConfig
from abmll.data import DataError, check_tasks, load_episode, load_split, resolve_data_dir, task_meta
from abmll.metrics import macro_f1
from abmll.scoring import make_batches, merge_truncation, truncation_summary


def resolve_tasks(bench: BenchArgs, cfg: RunConfig, need_train: bool) -> tuple[list[str], list[str], list[str]]:
    """(held-out tasks, meta-train tasks, notes): the explicit lists or the split's, keeping
    the tasks whose files the data layer reads; each task left out is named in a note."""
    tasks, notes = cfg.tasks, []
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


def task_stats(task: str, seeds, bench: BenchArgs, cfg: RunConfig, tokenizer) -> dict:
    """Chance rate (mean 1 / number of options), majority-class rate (share of the most
    frequent answer index) and the macro-F1 of always predicting it, of the evaluated
    examples, averaged over seeds; and ``truncation``, how many support and query inputs
    over all seeds were cut from the left to fit ``max_length``
    (:func:`abmll.scoring.merge_truncation` of each seed's :func:`~abmll.scoring.truncation_summary`)."""
    tasks, ev = cfg.tasks, cfg.eval
    per, cut = [], []
    for seed in seeds:
        ep = load_episode(task, test_k(bench, cfg), seed, bench.eval_split, ev.max_test, tasks.data_dir)
        cut.append(truncation_summary(make_batches(tokenizer, [*ep.support, *ep.query], cfg.scoring, ep.support)))
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
