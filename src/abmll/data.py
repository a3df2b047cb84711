"""Loading and validating MetaICL / CrossFit k-shot task files.

A data directory holds one folder per task with JSON-lines files
(``<task>/<task>_<k>_<seed>_{train,dev}.jsonl`` and a test file),
``splits/<name>.json`` meta-learning partitions and ``task_meta/<task>.json``.
Every problem with the data is reported as a :class:`DataError` (or its subclass
:class:`MissingTaskError`) whose message names the file and line, or the task.
"""

from __future__ import annotations

import json
import os
import random
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "metaicl"
"""``shared/data/metaicl`` next to the checkout; used when no directory is given."""

OPTION_TASK_TYPES = ("classification", "multi-choice")
TASK_TYPES = (*OPTION_TASK_TYPES, "free-form")
_KEYS = {"task": str, "input": str, "output": str, "options": list}


class DataError(ValueError):
    """Bad task data; the message names the file and 1-based line, or the task."""


class MissingTaskError(DataError):
    """A task, split or file is absent; ``missing`` lists the task names concerned."""

    def __init__(self, message: str, missing: Sequence[str] = ()):
        super().__init__(message)
        self.missing: list[str] = list(missing)


@dataclass(frozen=True)
class Example:
    """One labelled record.

    ``options`` is empty and ``label`` is -1 for free-form tasks; otherwise
    ``label`` is the index of the record's output in ``options``.
    ``source`` is ``"path:line"`` of the record, for error messages.
    """

    input: str
    options: tuple[str, ...]
    label: int
    source: str = ""


@dataclass
class Episode:
    """A task's support set (for adaptation) and query set (for the loss or evaluation)."""

    task: str
    support: list[Example]
    query: list[Example]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data directory to use.

    Precedence: the ``data_dir`` argument, else the ``ABMLL_DATA_DIR`` environment
    variable, else :data:`DEFAULT_DATA_DIR` when it exists.
    Raises DataError when none applies or the chosen directory does not exist.
    """
    if data_dir is None:
        data_dir = os.environ.get("ABMLL_DATA_DIR") or None
    if data_dir is None:
        if not DEFAULT_DATA_DIR.is_dir():
            raise DataError(f"no data directory: {DEFAULT_DATA_DIR} does not exist; pass --data-dir or set ABMLL_DATA_DIR")
        return DEFAULT_DATA_DIR
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    return path


def _parse_line(text: str, where: str, unlabelled: bool = False) -> dict:
    """Decode one JSON record and check its keys and value types (``output`` and ``task`` may
    be absent when ``unlabelled``: None and "")."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"{where}: malformed JSON ({err})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing_output = unlabelled and "output" not in record
    if unlabelled:  # inputs to predict: only input and options are needed
        record.setdefault("task", "")
    for key, kind in _KEYS.items():
        if key == "output" and missing_output:
            continue
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
        if not isinstance(record[key], kind):
            raise DataError(f"{where}: {key!r} must be {kind.__name__}, got {type(record[key]).__name__}")
    if missing_output:
        record["output"] = None
    if not all(isinstance(option, str) for option in record["options"]):
        raise DataError(f"{where}: 'options' must be a list of strings")
    for text in (record["input"], record["output"] or "", *record["options"]):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate such as "\ud800"
            raise DataError(f"{where}: text is not valid Unicode ({err.reason} at {err.start})") from None
    return record


def _visible(text: str) -> bool:
    """True when ``text`` has a character that is not whitespace, a control or a format
    character (such as a zero-width space)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for ch in text)


def _to_example(record: dict, where: str, option_task: bool) -> Example:
    """Turn a checked record into an Example, validating its options and output."""
    options = tuple(record["options"])
    if not options:
        if option_task:
            raise DataError(f"{where}: empty 'options' in a classification/multi-choice task")
        return Example(record["input"], (), -1, where)
    blank = [i for i, option in enumerate(options) if not _visible(option)]
    if blank:
        raise DataError(
            f"{where}: option {blank[0]} is empty or only whitespace / invisible characters "
            f"({options[blank[0]]!r}); it would be scored as a bare separator"
        )
    seen: dict[str, str] = {}
    for option in options:
        key = unicodedata.normalize("NFC", option).strip()
        if key in seen and seen[key] != option:
            raise DataError(
                f"{where}: options {seen[key]!r} and {option!r} differ only in surrounding whitespace "
                "or Unicode normalisation; a reader (and the scorer's tokens) cannot tell them apart"
            )
        seen[key] = option
    if len(options) == 1:
        raise DataError(
            f"{where}: only one option ({options[0]!r}): there is nothing to choose between; "
            "give at least two options or remove the line"
        )
    duplicates = sorted({option for option in options if options.count(option) > 1})
    if duplicates:
        raise DataError(f"{where}: duplicate options {duplicates}")
    if record["output"] is None:
        return Example(record["input"], options, -1, where)
    if record["output"] not in options:
        raise DataError(f"{where}: output {record['output']!r} is not one of the options {list(options)}")
    return Example(record["input"], options, options.index(record["output"]), where)


NOT_JSONL_HINT = (
    'abmll reads JSON lines ({"task", "input", "output", "options"} per line); a CSV, TSV or '
    "Hugging Face dataset becomes such files with `abmll data` (see README: Data format and `abmll data`)"
)
"""Added to the error of a file whose first line is not JSON (a CSV given as a task file)."""


def read_jsonl(path: str | os.PathLike, task_type: str | None = None, unlabelled: bool = False) -> list[Example]:
    """Read and validate a JSON-lines task file into a list of Examples, in file order.

    Each non-blank line must be a UTF-8 JSON object with ``task``, ``input``,
    ``output`` (str) and ``options`` (list of distinct str). For classification and
    multi-choice tasks (``task_type`` given, or inferred when None: a file where any
    record has options) options must be non-empty and contain the output.
    Free-form records (empty options) become ``Example(input, (), -1)``. With ``unlabelled``
    (inputs to predict), a record may leave ``output`` out (an Example with label -1) and
    ``task`` too.
    Raises DataError naming ``path:line`` and the problem, or the file when it is
    absent or has no examples.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"{path}: unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    records = []
    try:
        with open(path, "rb") as lines:
            for lineno, raw in enumerate(lines, 1):
                where = f"{path}:{lineno}"
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is read, not refused
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}: not UTF-8 ({err})") from None
                if text.strip():
                    try:
                        records.append((_parse_line(text, where, unlabelled), where))
                    except DataError as err:
                        if lineno == 1 and not text.lstrip().startswith(("{", "[")):  # not JSON lines at all
                            raise DataError(f"{err}; {NOT_JSONL_HINT}") from None
                        raise
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    if not records:
        raise DataError(f"{path}: no examples")
    if task_type is None:
        option_task = any(record["options"] for record, _ in records)
    else:
        option_task = task_type in OPTION_TASK_TYPES
    return [_to_example(record, where, option_task) for record, where in records]


def _read_json(path: Path) -> object:
    """Load a whole JSON file, turning decoding problems into DataError."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: malformed JSON ({err})") from None


def load_split(name: str, data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Read ``splits/<name>.json``: a dict such as ``{"train": [task, ...], "test": [...]}``.

    Raises DataError listing the available split names when ``name`` is unknown, or
    when the file is not a JSON object of task-name lists.
    """
    splits_dir = resolve_data_dir(data_dir) / "splits"
    path = splits_dir / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in splits_dir.glob("*.json"))
        raise DataError(f"unknown split {name!r} (no {path}); available: {', '.join(available) or 'none'}")
    split = _read_json(path)
    if not isinstance(split, dict) or not all(
        isinstance(tasks, list) and all(isinstance(t, str) for t in tasks) for tasks in split.values()
    ):
        raise DataError(f"{path}: expected an object mapping names to lists of task names")
    return split


def task_meta(task: str, data_dir: str | os.PathLike | None = None) -> dict:
    """Read ``task_meta/<task>.json``: ``{"task_type": ..., "options": [...]}``.

    Raises MissingTaskError when the file is absent, DataError when it is malformed.
    """
    path = resolve_data_dir(data_dir) / "task_meta" / f"{task}.json"
    if not path.is_file():
        raise MissingTaskError(f"task {task!r}: no metadata file {path}", [task])
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("task_type") not in TASK_TYPES:
        raise DataError(f"{path}: expected an object with 'task_type' in {TASK_TYPES}")
    return meta


def check_tasks(tasks: Sequence[str], data_dir: str | os.PathLike | None = None, skip_missing: bool = False) -> list[str]:
    """Return the tasks that have a folder in the data directory, in the given order.

    When some are absent: with ``skip_missing=False`` raise MissingTaskError listing all
    of them; with ``skip_missing=True`` warn (UserWarning) listing them and return the
    rest. Raises MissingTaskError when no task is present at all.
    """
    root = resolve_data_dir(data_dir)
    present = [task for task in tasks if (root / task).is_dir()]
    missing = [task for task in tasks if not (root / task).is_dir()]
    listed = ", ".join(missing)
    if not present:
        raise MissingTaskError(f"none of the tasks is present in {root} (missing: {listed or 'no tasks given'})", missing)
    if missing and not skip_missing:
        raise MissingTaskError(
            f"{len(missing)} task(s) absent from {root}: {listed}; "
            "use skip_missing=True (--skip-missing) to continue without them",
            missing,
        )
    if missing:
        warnings.warn(f"skipping {len(missing)} task(s) absent from {root}: {listed}", stacklevel=2)
    return present


def load_examples(
    task: str, split: str, k: int = 16, seed: int = 100, data_dir: str | os.PathLike | None = None
) -> list[Example]:
    """Read one split (``"train"``, ``"dev"`` or ``"test"``) of a task's (k, seed) files.

    The test split is ``<task>_<k>_<seed>_test.jsonl`` when present, else
    ``<task>_test.jsonl``. The task type comes from ``task_meta/<task>.json`` when it
    exists, else is inferred from the records. Raises ValueError for an unknown split,
    MissingTaskError naming the task and expected path(s) when the folder or file is
    absent, DataError for invalid records.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', got {split!r}")
    root = resolve_data_dir(data_dir)
    folder = root / task
    if not folder.is_dir():
        raise MissingTaskError(f"task {task!r}: no folder {folder}", [task])
    candidates = [folder / f"{task}_{k}_{seed}_{split}.jsonl"]
    if split == "test":
        candidates.append(folder / f"{task}_test.jsonl")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        expected = " or ".join(str(p) for p in candidates)
        raise MissingTaskError(f"task {task!r}: no {split} file (expected {expected})", [task])
    has_meta = (root / "task_meta" / f"{task}.json").is_file()
    return read_jsonl(path, task_meta(task, root)["task_type"] if has_meta else None)


def load_episode(
    task: str,
    k: int = 16,
    seed: int = 100,
    query_split: str = "dev",
    max_query: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Episode:
    """Build an Episode: support = the (k, seed) train file, query = its dev or test split.

    ``query_split`` is ``"dev"`` (meta-training) or ``"test"`` (evaluation). When
    ``max_query`` is given and the query is larger, keep a subset of ``max_query``
    examples drawn with ``random.Random(seed)``, in their original order. ``k`` only names
    the file (``<task>_<k>_<seed>_train.jsonl``): the support holds what that file has, even
    if that is fewer than k examples.
    Raises ValueError for a bad ``query_split`` or ``max_query``, and the errors of
    :func:`load_examples` (a DataError naming the file when a set is empty).
    """
    if query_split not in ("dev", "test"):
        raise ValueError(f"query_split must be 'dev' or 'test', got {query_split!r}")
    if max_query is not None and max_query < 1:
        raise ValueError(f"max_query must be a positive integer or None, got {max_query}")
    support = load_examples(task, "train", k, seed, data_dir)
    query = load_examples(task, query_split, k, seed, data_dir)
    if max_query is not None and len(query) > max_query:
        keep = sorted(random.Random(seed).sample(range(len(query)), max_query))
        query = [query[i] for i in keep]
    return Episode(task, support, query)


def check_task_files(
    tasks: Sequence[str], splits: Sequence[str], k: int, seeds: Sequence[int], data_dir: str | os.PathLike | None = None
) -> None:
    """Read and validate every file a run will use: each split in ``splits`` ("train", "dev",
    "test") of each task for each data seed, so a bad line is found before any model is
    loaded rather than when the task is first sampled.

    Raises:
        DataError: listing every problem found (file and line, or missing file), up to 10.
    """
    problems = []
    for task in tasks:
        for seed in seeds:
            for split in splits:
                if split == "test" and problems and problems[-1].startswith(f"task {task!r}: no test"):
                    continue
                try:
                    load_examples(task, split, k, seed, data_dir)
                except DataError as err:
                    if str(err) not in problems:
                        problems.append(str(err))
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} problem(s) in the task files:\n  " + "\n  ".join(problems[:10]) + more)
