"""Build MetaICL / CrossFit k-shot task files from any tabular dataset (e.g. Hugging Face
``datasets``), so new tasks are made the way the CrossFit / UnifiedQA tasks were.

Input: a mapping split name -> iterable of row dicts (a ``datasets.DatasetDict`` is one; so
is ``{"train": [{"text": ..., "label": 0}, ...], "test": [...]}``) and a
:class:`ColumnMapping` saying which columns hold the input, the answer and the options.

Output, in ``out_dir`` (the layout :mod:`abmll.data` reads):

- ``<task>/<task>_<k>_<seed>_train.jsonl`` and ``..._dev.jsonl`` for each k and seed,
  sampled as CrossFit / MetaICL do: the usable training rows are shuffled with
  ``numpy.random.seed(seed); numpy.random.shuffle(rows)``, the first k are the train file
  and the next k the dev file;
- ``<task>/<task>_test.jsonl``: the usable rows of the test split (all, or ``max_test`` of
  them drawn with a fixed seed, kept in their order);
- ``task_meta/<task>.json``: ``{"task_type", "options"}``.

Each record is ``{"task", "input", "output", "options"}``. Rows whose label is missing or
negative (hidden test labels), rows whose options repeat (the data contract forbids
duplicates) and rows with an empty option or text that is not valid Unicode (a lone
surrogate) are skipped and counted; anything else that does not fit raises
:class:`ConversionError` naming the split and row.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abmll.checkpoint import atomic_write, write_json
from abmll.data import TASK_TYPES, DataError

DATA_SEEDS = (100, 13, 21, 42, 87)
"""MetaICL's data seeds."""


class ConversionError(DataError):
    """A dataset cannot be converted with the given column mapping; names the split and row."""


@dataclass
class ColumnMapping:
    """Which columns of a row make a record.

    Attributes:
        input_columns: columns joined by ``input_separator`` into the input text.
        output_column: the answer: a string (the option itself) or an int index (a
            ``datasets`` ClassLabel) mapped to a name by ``label_names``, else by the fixed
            ``options``, else by the dataset's ClassLabel names, else by the row's options.
        options: a fixed option list (classification), or empty.
        options_column: a column holding each row's option list (multiple choice); overrides
            ``options``. With neither, the task is free-form (no options).
        label_names: names of int labels, in label order.
        input_template: a ``str.format`` template over the row's columns (e.g.
            ``"{premise} [SEP] {hypothesis}"``); overrides ``input_columns``.
        input_separator: joins ``input_columns``; CrossFit uses " [SEP] ".
        task_type: classification | multi-choice | free-form; default: classification with
            fixed options, multi-choice with an options column, free-form with neither.
    """

    input_columns: list[str] = field(default_factory=list)
    output_column: str = "label"
    options: list[str] = field(default_factory=list)
    options_column: str | None = None
    label_names: list[str] = field(default_factory=list)
    input_template: str | None = None
    input_separator: str = " [SEP] "
    task_type: str | None = None

    def resolved_task_type(self) -> str:
        """``task_type``, or the default implied by the options given (see the class doc)."""
        if self.task_type:
            if self.task_type not in TASK_TYPES:
                raise ConversionError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
            return self.task_type
        if self.options_column:
            return "multi-choice"
        return "classification" if self.options else "free-form"


def _class_names(split: Any, column: str) -> list[str] | None:
    """ClassLabel names of ``column`` when ``split`` is a ``datasets.Dataset`` with features."""
    features = getattr(split, "features", None)
    feature = features.get(column) if isinstance(features, Mapping) else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _records(
    rows: Iterable[dict], split: str, task: str, mapping: ColumnMapping, class_names: list[str] | None, counts: dict[str, int]
) -> list[dict]:
    """Convert one split's rows into records, updating ``counts``."""
    out = []
    option_task = mapping.resolved_task_type() != "free-form"
    for i, row in enumerate(rows):
        where = f"split {split!r}, row {i}"
        counts["rows"] += 1
        if not isinstance(row, Mapping):
            raise ConversionError(f"{where}: expected a dict of columns, got {type(row).__name__}")
        try:
            if mapping.input_template is not None:
                text = mapping.input_template.format(**row)
            else:
                text = mapping.input_separator.join(str(row[c]) for c in mapping.input_columns)
            raw = row[mapping.output_column]
            options = list(row[mapping.options_column]) if mapping.options_column else list(mapping.options)
        except KeyError as err:
            raise ConversionError(f"{where}: no column {err.args[0]!r} (columns: {sorted(row)})") from None
        if raw is None or (isinstance(raw, int) and not isinstance(raw, bool) and raw < 0):
            counts["skipped_unlabelled"] += 1
            continue
        if isinstance(raw, int) and not isinstance(raw, bool):
            names = mapping.label_names or mapping.options or class_names or options
            if not names:
                raise ConversionError(
                    f"{where}: label {raw} is an index but no label names are known (pass label_names or options)"
                )
            if raw >= len(names):
                raise ConversionError(f"{where}: label {raw} is out of range for label names {names}")
            output = str(names[raw])
        else:
            output = str(raw)
        options = [str(o) for o in options]
        if len(set(options)) != len(options):
            counts["skipped_duplicate_options"] += 1
            continue
        if "" in options or not _valid_unicode(text, output, *options):
            counts["skipped_invalid_text"] += 1  # abmll.data / scoring would refuse the record
            continue
        if option_task and output not in options:
            raise ConversionError(f"{where}: output {output!r} is not one of the options {options}")
        out.append({"task": task, "input": text, "output": output, "options": options if option_task else []})
    counts["kept"] = len(out)
    return out


def _valid_unicode(*texts: str) -> bool:
    """False when a text holds a lone surrogate (not encodable as UTF-8)."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_jsonl(path: Path, records: Sequence[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def stratified_holdout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest, held out): round(fraction x n_c) of each answer c's records (at least one of a
    class with two or more, none of a class with one) held out, drawn with
    ``random.Random(seed)``; both lists keep the input order. Free-form records are one class.

    Raises:
        ConversionError: nothing would be held out, or nothing left.
    """
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r["output"], []).append(i)
    held = set()
    for output in sorted(by_class):
        idx = by_class[output]
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.update(rng.sample(idx, n))
    if not held or len(held) == len(records):
        raise ConversionError(f"holding out {fraction:g} of {len(records)} usable rows leaves an empty train or test part")
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def convert_dataset(
    splits: Mapping[str, Iterable[dict]],
    task: str,
    out_dir: str | os.PathLike,
    mapping: ColumnMapping,
    shots: Sequence[int] = (16,),
    seeds: Sequence[int] = DATA_SEEDS,
    train_split: str = "train",
    test_split: str | None = None,
    max_test: int | None = None,
    test_fraction: float | None = None,
    holdout_seed: int = 0,
) -> dict[str, Any]:
    """Write a task's k-shot files (see the module docstring) and return a report.

    Args:
        splits: split name -> iterable of row dicts (e.g. a ``datasets.DatasetDict``).
        task: task name (folder and file prefix, and the records' ``task``).
        out_dir: the data directory to write into (``<out_dir>/<task>/``, ``<out_dir>/task_meta/``).
        shots: the k values; each (k, seed) takes 2k training rows (k train + k dev).
        test_split: default "test" when present, else "validation".
        max_test: keep at most this many test rows (a fixed-seed sample, in order).
        test_fraction: instead of a test split, hold out this fraction of the training
            split's usable rows as the test file (:func:`stratified_holdout`, seeded by
            ``holdout_seed``); the k-shot files are sampled from the rest.
    Returns:
        ``{"task", "task_type", "options", "train_split", "test_split", "counts": {split:
        {"rows", "kept", "skipped_unlabelled", "skipped_duplicate_options", "skipped_invalid_text"}},
        "files": [...]}``.
    Raises:
        ConversionError: a split is missing, a column is missing, a label cannot be mapped to
            an option, the training split has fewer than 2 * max(shots) usable rows, or the
            test split has none.
    """
    if not task or "/" in task or os.sep in task:
        raise ConversionError(f"task name must be a plain folder name, got {task!r}")
    if not shots or min(shots) < 1:
        raise ConversionError(f"shots must be positive integers, got {list(shots)}")
    task_type = mapping.resolved_task_type()
    if test_fraction is not None:
        if test_split is not None:
            raise ConversionError("give a test split or a test fraction of the training split, not both")
        if not 0 < test_fraction < 1:
            raise ConversionError(f"test fraction must be in (0, 1), got {test_fraction}")
    elif test_split is None:
        test_split = "test" if "test" in splits else "validation"
    for name in (train_split,) if test_fraction is not None else (train_split, test_split):
        if name not in splits:
            hint = (
                f"; name the test split (--test_split), or hold out part of {train_split!r} as the test file "
                "(--test_fraction 0.2)"
                if name == test_split
                else "; name the training split (--train_split)"
            )
            raise ConversionError(f"no split {name!r} in the dataset (splits: {sorted(splits)}){hint}")
    counts = {}
    converted = {}
    for name in dict.fromkeys((train_split,) if test_fraction is not None else (train_split, test_split)):
        counts[name] = {"rows": 0, "kept": 0, "skipped_unlabelled": 0, "skipped_duplicate_options": 0, "skipped_invalid_text": 0}
        converted[name] = _records(
            splits[name], name, task, mapping, _class_names(splits[name], mapping.output_column), counts[name]
        )
    if test_fraction is not None:
        test_split = f"{train_split} (held out: {test_fraction:g}, seed {holdout_seed})"
        train, test = stratified_holdout(converted[train_split], test_fraction, holdout_seed)
        counts[test_split] = {"rows": len(test), "kept": len(test)}
        counts[train_split]["kept"] = len(train)
    else:
        train, test = converted[train_split], converted[test_split]
    need = 2 * max(shots)
    if len(train) < need:
        raise ConversionError(
            f"split {train_split!r} has {len(train)} usable rows; k={max(shots)} needs {need} "
            f"(k train + k dev), counts {counts[train_split]}"
        )
    if not test:
        raise ConversionError(f"split {test_split!r} has no labelled rows ({counts[test_split]}); choose another test split")
    if max_test is not None and len(test) > max_test:
        keep = sorted(random.Random(0).sample(range(len(test)), max_test))
        test = [test[i] for i in keep]

    folder = Path(out_dir) / task
    files = []
    for k in shots:
        for seed in seeds:
            rows = list(train)
            np.random.RandomState(seed).shuffle(rows)  # = numpy.random.seed(seed); numpy.random.shuffle(rows)
            for part, chunk in (("train", rows[:k]), ("dev", rows[k : 2 * k])):
                path = folder / f"{task}_{k}_{seed}_{part}.jsonl"
                _write_jsonl(path, chunk)
                files.append(str(path))
    test_path = folder / f"{task}_test.jsonl"
    _write_jsonl(test_path, test)
    files.append(str(test_path))
    fixed = mapping.options if task_type == "classification" else []
    if task_type == "classification" and not fixed:
        fixed = sorted({o for r in train + test for o in r["options"]})
    meta_path = Path(out_dir) / "task_meta" / f"{task}.json"
    write_json(meta_path, {"task_type": task_type, "options": list(fixed)})
    files.append(str(meta_path))
    return {
        "task": task,
        "task_type": task_type,
        "options": list(fixed),
        "train_split": train_split,
        "test_split": test_split,
        "counts": counts,
        "files": files,
    }


def read_jsonl_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file (any columns), for converting local files without ``datasets``.

    Raises:
        ConversionError: unreadable file or a line that is not a JSON object (names path:line).
    """
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as lines:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise ConversionError(f"{path}:{lineno}: malformed JSON ({err})") from None
                if not isinstance(row, dict):
                    raise ConversionError(f"{path}:{lineno}: expected a JSON object")
                rows.append(row)
    except (OSError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: cannot read ({err})") from None
    return rows


def load_hf_dataset(
    name_or_path: str, config_name: str | None = None, data_files: Mapping[str, str] | None = None
) -> Mapping[str, Iterable[dict]]:
    """Load a dataset with Hugging Face ``datasets`` (imported only here): a folder written by
    ``save_to_disk``, else ``load_dataset(name_or_path, config_name, data_files=...)`` (a hub
    id, a loading script, or a builder such as "csv" / "json" with ``data_files``).

    Raises:
        ConversionError: ``datasets`` is not installed (the message says how to install it or
            how to convert local JSON-lines files without it).
    """
    try:
        import datasets
    except ImportError:
        raise ConversionError(
            "abmll data needs the Hugging Face `datasets` package to load a dataset: pip install datasets "
            "(or pass local JSON-lines files with --data_files split=path.jsonl, which need no extra package)"
        ) from None
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, Mapping) else {"train": loaded}
    return datasets.load_dataset(name_or_path, config_name, data_files=dict(data_files) if data_files else None)
