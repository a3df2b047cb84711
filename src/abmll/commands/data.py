"""``abmll data``: a dataset converted into the MetaICL k-shot layout."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from abmll.args import DataArgs, RunArgs
from abmll.checkpoint import write_json
from abmll.convert import convert_dataset, load_hf_dataset, read_jsonl_rows


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
    report = convert_dataset(
        splits,
        args.task,
        run.out,
        args,
        args.shots,
        args.data_seeds,
        args.train_split,
        args.test_split,
        args.test_rows,
        args.test_fraction,
        args.holdout_seed,
    )
    write_json(Path(run.out) / args.task / "abmll_data_config.json", {"data": asdict(args), "report": report})
    for split, counts in report["counts"].items():
        print(f"{split}: {counts}")
    print(f"task {args.task!r} ({report['task_type']}) written to {Path(run.out) / args.task}")
    return report
