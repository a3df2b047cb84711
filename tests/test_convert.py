"""`abmll data`: any dataset (rows of dicts per split) -> MetaICL k-shot layout, read back by abmll.data."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from conftest import cli_flags

from abmll.cli import main
from abmll.convert import ColumnMapping, ConversionError, convert_dataset
from abmll.data import load_episode, load_examples, read_jsonl, task_meta

SEEDS = (100, 13, 21, 42, 87)


def sentiment_dataset(n_train: int = 40, n_test: int = 7) -> dict[str, list[dict]]:
    """A local classification dataset: int labels (as a ClassLabel would give), two text columns."""

    def rows(n, offset):
        return [{"title": f"t{offset + i}", "text": f"review {offset + i}", "label": (offset + i) % 2} for i in range(n)]

    return {"train": rows(n_train, 0), "test": rows(n_test, 1000)}


class FakeSplit(list):
    """A list of rows with ``datasets``-style ``features`` (a ClassLabel with names)."""

    class _ClassLabel:
        names = ["negative", "positive"]

    features = {"label": _ClassLabel()}


def test_k_shot_files_follow_metaicl_sampling_and_read_back(tmp_path):
    data = sentiment_dataset()
    mapping = ColumnMapping(input_columns=["title", "text"], output_column="label", options=["negative", "positive"])
    report = convert_dataset(data, "toy_sentiment", tmp_path, mapping, shots=[4, 8], seeds=SEEDS)
    assert report["task_type"] == "classification"
    assert report["counts"]["train"] == {
        "rows": 40,
        "kept": 40,
        "skipped_unlabelled": 0,
        "skipped_duplicate_options": 0,
        "skipped_invalid_text": 0,
    }
    assert len(report["files"]) == 2 * 5 * 2 + 2
    assert task_meta("toy_sentiment", tmp_path) == {"task_type": "classification", "options": ["negative", "positive"]}

    for k in (4, 8):
        for seed in SEEDS:
            ep = load_episode("toy_sentiment", k, seed, "dev", data_dir=tmp_path)
            assert len(ep.support) == k and len(ep.query) == k
            order = list(range(40))
            np.random.seed(seed)  # CrossFit / MetaICL: seed, shuffle, first k, next k
            np.random.shuffle(order)
            expected = [f"t{i} [SEP] review {i}" for i in order[: 2 * k]]
            assert [e.input for e in ep.support + ep.query] == expected
            for e in ep.support:
                number = int(e.input.split()[0][1:])
                assert e.options == ("negative", "positive") and e.label == number % 2
    test = load_examples("toy_sentiment", "test", 4, 100, tmp_path)
    assert [e.input for e in test] == [f"t{1000 + i} [SEP] review {1000 + i}" for i in range(7)]
    assert [e.label for e in test] == [(1000 + i) % 2 for i in range(7)]
    assert load_episode("toy_sentiment", 4, 13, "test", data_dir=tmp_path).query == test
    different = load_episode("toy_sentiment", 4, 21, "dev", data_dir=tmp_path).support
    assert [e.input for e in different] != [
        e.input for e in load_episode("toy_sentiment", 4, 13, "dev", data_dir=tmp_path).support
    ]


def test_class_label_names_template_and_skipped_rows(tmp_path):
    train = FakeSplit([{"sentence": f"s{i}", "label": i % 2} for i in range(10)])
    test = FakeSplit([{"sentence": "hidden", "label": -1}, {"sentence": "shown", "label": 1}])
    mapping = ColumnMapping(input_template="Review: {sentence}", output_column="label")
    report = convert_dataset({"train": train, "validation": test}, "cls", tmp_path, mapping, shots=[2], seeds=[1])
    assert report["test_split"] == "validation" and report["task_type"] == "free-form"
    assert report["counts"]["validation"]["skipped_unlabelled"] == 1
    lines = [json.loads(x) for x in (tmp_path / "cls" / "cls_test.jsonl").read_text().splitlines()]
    assert lines == [{"task": "cls", "input": "Review: shown", "output": "positive", "options": []}]

    mapping = ColumnMapping(input_columns=["sentence"], output_column="label", task_type="classification")
    with pytest.raises(ConversionError, match="not one of the options"):
        convert_dataset({"train": train, "test": test}, "cls2", tmp_path, mapping, shots=[2])
    mapping = ColumnMapping(input_columns=["sentence"], options=["negative", "positive"])
    report = convert_dataset({"train": train, "test": test}, "cls2", tmp_path, mapping, shots=[2], seeds=[1])
    assert [e.label for e in load_examples("cls2", "test", 2, 1, tmp_path)] == [1]


def test_multiple_choice_with_options_column_and_index_answers(tmp_path):
    def row(i, dup=False):
        choices = [f"a{i}", f"b{i}", f"c{i}"] if not dup else ["x", "x", "y"]
        return {"question": f"q{i}?", "choices": choices, "answer": i % 3}

    bad = [
        {"question": "q?", "choices": ["", "b", "c"], "answer": 1},  # an empty option
        {"question": "q\ud800?", "choices": ["a", "b", "c"], "answer": 1},
    ]  # a lone surrogate
    data = {"train": [row(i) for i in range(12)] + [row(99, dup=True)] + bad, "test": [row(i) for i in range(20, 23)]}
    mapping = ColumnMapping(input_columns=["question"], output_column="answer", options_column="choices")
    report = convert_dataset(data, "mcq", tmp_path, mapping, shots=[3], seeds=[42], max_test=2)
    assert report["task_type"] == "multi-choice" and report["counts"]["train"]["skipped_duplicate_options"] == 1
    assert report["counts"]["train"]["skipped_invalid_text"] == 2 and report["counts"]["train"]["kept"] == 12
    assert task_meta("mcq", tmp_path) == {"task_type": "multi-choice", "options": []}
    ep = load_episode("mcq", 3, 42, "test", data_dir=tmp_path)
    assert len(ep.support) == 3 and len(ep.query) == 2
    for e in ep.support + ep.query:
        i = int(e.input[1:-1])
        assert e.options == (f"a{i}", f"b{i}", f"c{i}") and e.label == i % 3


def test_conversion_errors_name_split_row_and_column(tmp_path):
    data = sentiment_dataset(n_train=5)
    mapping = ColumnMapping(input_columns=["title"], options=["negative", "positive"])
    with pytest.raises(ConversionError, match="has 5 usable rows; k=4 needs 8"):
        convert_dataset(data, "t", tmp_path, mapping, shots=[4])
    with pytest.raises(ConversionError, match=r"split 'train', row 0: no column 'body'"):
        convert_dataset(data, "t", tmp_path, ColumnMapping(input_columns=["body"], options=["n", "p"]), shots=[1])
    with pytest.raises(ConversionError, match="no split 'dev'"):
        convert_dataset(data, "t", tmp_path, mapping, shots=[1], test_split="dev")
    with pytest.raises(ConversionError, match="out of range"):
        convert_dataset(data, "t", tmp_path, ColumnMapping(input_columns=["title"], options=["only"]), shots=[1])
    with pytest.raises(ConversionError, match="plain folder name"):
        convert_dataset(data, "../evil", tmp_path, mapping, shots=[1])
    assert not (tmp_path / "t").exists()


def test_cli_data_from_local_jsonl_files_and_config(tmp_path, capsys):
    data = sentiment_dataset(n_train=20, n_test=5)
    files = []
    for split, rows in data.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(f"{split}={path}")
    config = tmp_path / "data.yaml"  # a shared run file: sections of other commands are ignored
    config.write_text("meta:\n  inner_steps: 3\nshots: [4]\ndata_seeds: [100, 13]\nlabel_names: [neg, pos]\n")
    out = tmp_path / "metaicl"
    assert (
        main(
            [
                "data",
                "--config",
                str(config),
                "--task",
                "local_sst",
                "--data_files",
                *files,
                "--input_columns",
                "text",
                "--options",
                "pos",
                "neg",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "local_sst" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "local_sst").glob("*.jsonl")) == [
        "local_sst_4_100_dev.jsonl",
        "local_sst_4_100_train.jsonl",
        "local_sst_4_13_dev.jsonl",
        "local_sst_4_13_train.jsonl",
        "local_sst_test.jsonl",
    ]
    ep = load_episode("local_sst", 4, 13, "test", data_dir=out)
    # int labels are named by --label_names (0 -> neg), then located among the options (pos, neg)
    assert [e.options[e.label] for e in ep.query] == ["neg", "pos", "neg", "pos", "neg"]
    assert [e.label for e in ep.query] == [1, 0, 1, 0, 1]
    saved = json.loads((out / "local_sst" / "abmll_data_config.json").read_text())
    assert saved["data"]["shots"] == [4] and saved["data"]["label_names"] == ["neg", "pos"]
    assert saved["report"]["counts"]["test"]["kept"] == 5


def test_cli_data_without_datasets_package_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code = main(["data", *cli_flags(task="sst2", dataset="glue", dataset_config="sst2", input_columns="sentence", out=tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "pip install datasets" in err and "--data_files" in err


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_cli_data_builds_tasks_from_local_files_through_the_datasets_library(tmp_path, fmt):
    """``abmll data --dataset <csv|json|parquet> --data_files ...`` runs the real
    ``datasets.load_dataset``; the k-shot files are MetaICL's seeded shuffle, so two runs
    agree byte for byte and each seed's train file is the first k of its permutation."""
    datasets = pytest.importorskip("datasets")
    rows = {
        "train": [{"text": f"review {i}", "label": i % 2} for i in range(24)],
        "test": [{"text": f"test {i}", "label": (i + 1) % 2} for i in range(6)],
    }
    files = []
    for split, items in rows.items():
        path = tmp_path / f"{split}.{fmt}"
        table = datasets.Dataset.from_list(items)
        {"csv": table.to_csv, "json": table.to_json, "parquet": table.to_parquet}[fmt](str(path))
        files.append(f"{split}={path}")
    args = [
        "data",
        "--dataset",
        fmt,
        "--data_files",
        *files,
        "--task",
        "local",
        "--input_columns",
        "text",
        "--output_column",
        "label",
        "--label_names",
        "negative",
        "positive",
        "--options",
        "negative",
        "positive",
        "--shots",
        "4",
        "--data_seeds",
        "100",
        "13",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    names = sorted(p.name for p in (tmp_path / "a" / "local").glob("*.jsonl"))
    assert names == [
        "local_4_100_dev.jsonl",
        "local_4_100_train.jsonl",
        "local_4_13_dev.jsonl",
        "local_4_13_train.jsonl",
        "local_test.jsonl",
    ]
    for name in names:
        assert (tmp_path / "a" / "local" / name).read_bytes() == (tmp_path / "b" / "local" / name).read_bytes()
    order = list(range(24))
    np.random.RandomState(13).shuffle(order)
    episode = load_episode("local", 4, 13, "test", data_dir=tmp_path / "a")
    assert [e.input for e in episode.support] == [f"review {i}" for i in order[:4]]
    assert [e.options[e.label] for e in episode.query] == ["positive", "negative"] * 3


def test_one_file_dataset_holds_out_a_seeded_stratified_test_fraction(tmp_path):
    rows = [{"text": f"r{i}", "label": int(i % 4 == 0)} for i in range(40)]  # 10 positive, 30 negative
    mapping = ColumnMapping(input_columns=["text"], options=["negative", "positive"])
    with pytest.raises(ConversionError, match=r"no split 'validation'.*--test_fraction"):
        convert_dataset({"train": rows}, "one", tmp_path / "x", mapping, shots=[4])
    report = convert_dataset({"train": rows}, "one", tmp_path / "a", mapping, shots=[4], seeds=[100], test_fraction=0.2)
    test = read_jsonl(tmp_path / "a" / "one" / "one_test.jsonl")
    assert [e.label for e in test].count(1) == 2 and [e.label for e in test].count(0) == 6  # 20% of each class
    pool = {e.input for k in ("train", "dev") for e in read_jsonl(tmp_path / "a" / "one" / f"one_4_100_{k}.jsonl")}
    assert not pool & {e.input for e in test}  # the k-shot files come from the rest only
    assert report["counts"]["train"]["kept"] == 32 and "held out" in report["test_split"]
    again = convert_dataset({"train": rows}, "one", tmp_path / "b", mapping, shots=[4], seeds=[100], test_fraction=0.2)
    other = convert_dataset(
        {"train": rows}, "one", tmp_path / "c", mapping, shots=[4], seeds=[100], test_fraction=0.2, holdout_seed=1
    )
    read = lambda d: (tmp_path / d / "one" / "one_test.jsonl").read_text()  # noqa: E731
    assert read("a") == read("b") and read("a") != read("c") and again["counts"] == report["counts"]
    assert other["test_split"] == "train (held out: 0.2, seed 1)"
    for bad in (0.0, 1.0):
        with pytest.raises(ConversionError, match="fraction"):
            convert_dataset({"train": rows}, "one", tmp_path / "y", mapping, shots=[4], test_fraction=bad)
    with pytest.raises(ConversionError, match="not both"):
        convert_dataset(
            {"train": rows, "test": rows}, "one", tmp_path / "z", mapping, shots=[4], test_split="test", test_fraction=0.2
        )


def test_cli_wall_time_counts_the_start_up(tmp_path):
    import subprocess
    import time

    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": f"r{i}", "label": i % 2}) + "\n" for i in range(20)))
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "abmll", "data", "--data_files", f"train={tmp_path / 'r.jsonl'}", "--test_fraction", "0.25"]
        + ["--task", "r", "--input_columns", "text", "--options", "no", "yes", "--shots", "4", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - t0
    printed = float(out.rsplit("wall time: ", 1)[1].split()[0])
    # not just the conversion's own fraction of a second (the bug printed 0 s for a 7 s run); the
    # rest is the interpreter's start and exit around the entry's timer, 2 s on a cold fresh clone
    assert printed >= 0.5 * elapsed, (printed, elapsed)
