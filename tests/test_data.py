"""Tests for abmll.data: validation errors on synthetic files, and loading the real MetaICL data."""

import json
import random
import re
import warnings
from pathlib import Path

import pytest
from conftest import option_key, readable_option
from hypothesis import given, settings
from hypothesis import strategies as st

from abmll import data
from abmll.data import DataError, Episode, Example, MissingTaskError, read_jsonl

SST2_OPTIONS = ["negative", "positive"]
CLASS_TO_CLASS_ABSENT = [
    "yahoo_answers_topics",
    "amazon_polarity",
    "poem_sentiment",
    "climate_fever",
    "medical_questions_pairs",
    "superglue-cb",
    "dbpedia_14",
    "financial_phrasebank",
]


def record(input="x", output="a", options=("a", "b"), task="t"):
    return {"task": task, "input": input, "output": output, "options": list(options)}


def write_lines(path: Path, lines) -> Path:
    """Write JSON-lines: dicts are dumped, strings written verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def make_task(root: Path, task: str, k=16, seed=100, n_train=4, n_dev=4, test=None, task_type="classification"):
    """Create a task folder with train/dev files (records i -> output 'a'/'b'), and its metadata."""
    rows = lambda n: [record(input=f"{task} {i}", output="ab"[i % 2], task=task) for i in range(n)]
    write_lines(root / task / f"{task}_{k}_{seed}_train.jsonl", rows(n_train))
    write_lines(root / task / f"{task}_{k}_{seed}_dev.jsonl", rows(n_dev))
    if test is not None:
        write_lines(root / task / test, rows(3))
    meta = {"task_type": task_type, "options": ["a", "b"]}
    write_lines(root / "task_meta" / f"{task}.json", [meta])


@pytest.fixture
def fake_dir(tmp_path):
    make_task(tmp_path, "alpha", test="alpha_test.jsonl")
    make_task(tmp_path, "beta")
    write_lines(tmp_path / "splits" / "tiny.json", [{"train": ["alpha"], "test": ["beta", "gamma"]}])
    write_lines(tmp_path / "splits" / "other.json", [{"train": [], "test": []}])
    return tmp_path


@pytest.fixture(scope="module")
def real_dir():
    try:
        return data.resolve_data_dir()
    except DataError as err:
        pytest.skip(f"real MetaICL data not available: {err}")


# ---------------------------------------------------------------- read_jsonl errors


def assert_data_error(path, line, *fragments, task_type=None):
    with pytest.raises(DataError) as info:
        data.read_jsonl(path, task_type)
    message = str(info.value)
    assert f"{path}:{line}" in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record(), '{"task": "t", "input": '])
    assert_data_error(path, 2, "malformed JSON")


@pytest.mark.parametrize("first", ["text,label", "text\tlabel", "great film,positive"])
def test_a_csv_given_as_a_task_file_points_at_abmll_data(tmp_path, first):
    path = write_lines(tmp_path / "reviews.csv", [first, "awful,negative"])
    message = assert_data_error(path, 1, "malformed JSON", "`abmll data`")
    assert message.count("becomes such files with") == 1  # the hint, once
    broken = write_lines(tmp_path / "f.jsonl", ['{"task": "t", "input": '])  # JSON gone wrong: no hint
    assert "abmll data" not in assert_data_error(broken, 1, "malformed JSON")


@pytest.mark.parametrize("key", ["task", "input", "output", "options"])
def test_missing_key(tmp_path, key):
    bad = record()
    del bad[key]
    path = write_lines(tmp_path / "f.jsonl", [record(), record(), bad])
    assert_data_error(path, 3, "missing key", repr(key))


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("input", 3, "'input' must be str"),
        ("output", None, "'output' must be str"),
        ("options", "a b", "'options' must be list"),
        ("options", ["a", 1], "list of strings"),
    ],
)
def test_wrong_type(tmp_path, key, value, fragment):
    bad = record()
    bad[key] = value
    path = write_lines(tmp_path / "f.jsonl", [bad])
    assert_data_error(path, 1, fragment)


def test_non_object_line(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record(), "[1, 2]"])
    assert_data_error(path, 2, "expected a JSON object, got list")


def test_output_not_in_options(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record(output="c")])
    assert_data_error(path, 1, "'c' is not one of the options")


def test_empty_options_in_classification_task(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record(output="free", options=())])
    assert_data_error(path, 1, "empty 'options'", task_type="classification")
    # Inferred: another record of the file has options, so this is an option task.
    path = write_lines(tmp_path / "g.jsonl", [record(), record(output="free", options=())])
    assert_data_error(path, 2, "empty 'options'")


def test_duplicate_options(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record(options=("a", "b", "a"))])
    assert_data_error(path, 1, "duplicate options ['a']")


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record(), "", "   ", json.dumps(record(output="z"))])
    assert_data_error(path, 4, "'z'")


def test_not_utf8(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(json.dumps(record()).encode() + b"\n\xff\xfe\n")
    assert_data_error(path, 2, "not UTF-8")


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "f.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="no examples") as info:
        data.read_jsonl(path)
    assert str(path) in str(info.value)


def test_unknown_task_type(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record()])
    with pytest.raises(DataError, match=re.escape(f"{path}: unknown task type 'regression'")):
        data.read_jsonl(path, "regression")


def test_valid_file_labels_and_free_form(tmp_path):
    path = write_lines(tmp_path / "f.jsonl", [record("q1", "b", ("a", "b", "c")), "", record("q2", "a")])
    assert data.read_jsonl(path, "multi-choice") == [
        Example("q1", ("a", "b", "c"), 1, f"{path}:1"),
        Example("q2", ("a", "b"), 0, f"{path}:3"),
    ]
    path = write_lines(tmp_path / "ff.jsonl", [record("q", "some answer", ())])
    assert data.read_jsonl(path, "free-form") == [Example("q", (), -1, f"{path}:1")]
    assert data.read_jsonl(path) == [Example("q", (), -1, f"{path}:1")]


# ---------------------------------------------------------------- read_jsonl properties

options_lists = st.lists(
    st.text(max_size=20).filter(readable_option), min_size=2, max_size=6, unique_by=option_key
)  # >= 2 distinct, readable options
emoji_text = st.text(alphabet='😀🎉👍🏽🇫🇷ñ中文\u2028\u0085\r\t"\\ ', max_size=30)


@settings(max_examples=50, deadline=None)
@given(input=st.one_of(st.text(), emoji_text), options=options_lists, data_=st.data())
def test_unicode_round_trip(tmp_path_factory, input, options, data_):
    output = data_.draw(st.sampled_from(options))
    path = tmp_path_factory.mktemp("rt") / "f.jsonl"
    path.write_text(json.dumps(record(input, output, options), ensure_ascii=False) + "\n", encoding="utf-8")
    (example,) = data.read_jsonl(path)
    assert example.input == input
    assert example.options == tuple(options)
    assert example.options[example.label] == output


@settings(max_examples=50, deadline=None)
@given(options=options_lists.filter(lambda o: len(o) >= 3), n_good=st.integers(0, 3), data_=st.data())
def test_answer_missing_from_options_raises(tmp_path_factory, options, n_good, data_):
    answer = data_.draw(st.sampled_from(options))
    good = [record("ok", options[0], options)] * n_good
    bad = record("bad", answer, [o for o in options if o != answer])
    path = write_lines(tmp_path_factory.mktemp("miss") / "f.jsonl", good + [bad])
    assert_data_error(path, n_good + 1, "not one of the options")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["task", "input", "output", "options"]) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=12,
)
junk_lines = st.one_of(
    st.text(max_size=60).map(str.encode),
    st.binary(max_size=60),
    json_values.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=50, deadline=None)
@given(lines=st.lists(junk_lines, max_size=4), task_type=st.sampled_from([None, *data.TASK_TYPES]))
def test_junk_only_ever_raises_data_error(tmp_path_factory, lines, task_type):
    path = tmp_path_factory.mktemp("junk") / "f.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        examples = data.read_jsonl(path, task_type)
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert examples and all(isinstance(e, Example) for e in examples)


# ---------------------------------------------------------------- directory, splits, tasks


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    arg, env, default = (tmp_path / name for name in ("arg", "env", "default"))
    for d in (arg, env, default):
        d.mkdir()
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", default)
    monkeypatch.setenv("ABMLL_DATA_DIR", str(env))
    assert data.resolve_data_dir(arg) == arg
    assert data.resolve_data_dir(str(arg)) == arg
    assert data.resolve_data_dir() == env
    monkeypatch.delenv("ABMLL_DATA_DIR")
    assert data.resolve_data_dir() == default


def test_resolve_data_dir_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("ABMLL_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="--data-dir or set ABMLL_DATA_DIR"):
        data.resolve_data_dir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        data.resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("ABMLL_DATA_DIR", str(tmp_path / "also-nope"))
    with pytest.raises(DataError, match="also-nope"):
        data.resolve_data_dir()


def test_default_data_dir_is_next_to_checkout():
    checkout = Path(data.__file__).resolve().parents[2]
    assert data.DEFAULT_DATA_DIR == checkout.parent / "shared" / "data" / "metaicl"


def test_load_split(fake_dir):
    assert data.load_split("tiny", fake_dir) == {"train": ["alpha"], "test": ["beta", "gamma"]}


def test_missing_split_lists_available(fake_dir):
    with pytest.raises(DataError, match="unknown split 'nope'.*available: other, tiny") as info:
        data.load_split("nope", fake_dir)
    assert str(fake_dir / "splits" / "nope.json") in str(info.value)  # the file it looked for


def test_task_meta(fake_dir):
    assert data.task_meta("alpha", fake_dir)["task_type"] == "classification"
    with pytest.raises(MissingTaskError, match="'gamma'") as info:
        data.task_meta("gamma", fake_dir)
    assert info.value.missing == ["gamma"]


def test_check_tasks_fake(fake_dir):
    tasks = data.load_split("tiny", fake_dir)["test"] + ["delta", "alpha"]
    with pytest.raises(MissingTaskError, match="gamma, delta.*skip_missing") as info:
        data.check_tasks(tasks, fake_dir)
    assert info.value.missing == ["gamma", "delta"]
    with pytest.warns(UserWarning, match="gamma, delta"):
        assert data.check_tasks(tasks, fake_dir, skip_missing=True) == ["beta", "alpha"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.check_tasks(["beta", "alpha"], fake_dir) == ["beta", "alpha"]
    with pytest.raises(MissingTaskError, match="none of the tasks") as info:
        data.check_tasks(["gamma"], fake_dir, skip_missing=True)
    assert info.value.missing == ["gamma"]


def test_missing_task(fake_dir):
    with pytest.raises(MissingTaskError, match="'gamma'") as info:
        data.load_examples("gamma", "train", data_dir=fake_dir)
    assert info.value.missing == ["gamma"]
    assert str(fake_dir / "gamma") in str(info.value)


def test_missing_train_file_names_path(fake_dir):
    with pytest.raises(MissingTaskError) as info:
        data.load_examples("alpha", "train", k=8, data_dir=fake_dir)
    assert str(fake_dir / "alpha" / "alpha_8_100_train.jsonl") in str(info.value)


def test_missing_test_file_names_both_paths(fake_dir):
    with pytest.raises(MissingTaskError) as info:
        data.load_examples("beta", "test", data_dir=fake_dir)
    message = str(info.value)
    assert str(fake_dir / "beta" / "beta_16_100_test.jsonl") in message
    assert str(fake_dir / "beta" / "beta_test.jsonl") in message
    assert info.value.missing == ["beta"]


def test_test_file_prefers_k_seed_file(fake_dir):
    assert data.load_examples("alpha", "test", data_dir=fake_dir)[0].source.endswith("alpha_test.jsonl:1")
    write_lines(fake_dir / "alpha" / "alpha_16_100_test.jsonl", [record("specific", "b")])
    (example,) = data.load_examples("alpha", "test", data_dir=fake_dir)
    assert (example.input, example.label) == ("specific", 1)


def test_bad_split_argument(fake_dir):
    with pytest.raises(ValueError, match="'valid'"):
        data.load_examples("alpha", "valid", data_dir=fake_dir)
    with pytest.raises(ValueError, match="'train'"):
        data.load_episode("alpha", query_split="train", data_dir=fake_dir)
    with pytest.raises(ValueError, match="max_query"):
        data.load_episode("alpha", max_query=0, data_dir=fake_dir)


def test_load_examples_uses_task_meta_type(tmp_path):
    make_task(tmp_path, "ff", task_type="classification")
    write_lines(tmp_path / "ff" / "ff_16_100_train.jsonl", [record("q", "free text", ())])
    path = tmp_path / "ff" / "ff_16_100_train.jsonl"
    with pytest.raises(DataError, match=re.escape(f"{path}:1: empty 'options'")):
        data.load_examples("ff", "train", data_dir=tmp_path)
    write_lines(tmp_path / "task_meta" / "ff.json", [{"task_type": "free-form", "options": []}])
    assert data.load_examples("ff", "train", data_dir=tmp_path)[0].label == -1


def test_episode_empty_support_names_task_file(fake_dir):
    (fake_dir / "alpha" / "alpha_16_100_train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no examples") as info:
        data.load_episode("alpha", data_dir=fake_dir)
    assert str(fake_dir / "alpha" / "alpha_16_100_train.jsonl") in str(info.value)


def test_episode_max_query_subset(tmp_path):
    make_task(tmp_path, "many", seed=7, n_train=2, n_dev=10)
    full = data.load_episode("many", seed=7, data_dir=tmp_path)
    assert [e.input for e in full.query] == [f"many {i}" for i in range(10)]
    assert len(full.support) == 2
    sub = data.load_episode("many", seed=7, max_query=4, data_dir=tmp_path)
    keep = sorted(random.Random(7).sample(range(10), 4))
    assert sub.query == [full.query[i] for i in keep]
    assert data.load_episode("many", seed=7, max_query=50, data_dir=tmp_path).query == full.query


# ---------------------------------------------------------------- real MetaICL data


def test_real_class_to_class_missing_tasks(real_dir):
    split = data.load_split("class_to_class", real_dir)
    tasks = list(dict.fromkeys(split["train"] + split["test"] + split["unseen_domain_test"]))
    with pytest.raises(MissingTaskError) as info:
        data.check_tasks(tasks, real_dir)
    assert info.value.missing == CLASS_TO_CLASS_ABSENT
    for name in CLASS_TO_CLASS_ABSENT:
        assert name in str(info.value)
    with pytest.warns(UserWarning) as caught:
        present = data.check_tasks(tasks, real_dir, skip_missing=True)
    assert all(name in str(caught[0].message) for name in CLASS_TO_CLASS_ABSENT)
    assert present == [t for t in tasks if t not in CLASS_TO_CLASS_ABSENT]
    assert len(present) == len(tasks) - len(CLASS_TO_CLASS_ABSENT) == 55


def test_real_sst2_episode(real_dir):
    episode = data.load_episode("glue-sst2", 16, 42, data_dir=real_dir)
    assert isinstance(episode, Episode) and episode.task == "glue-sst2"
    assert len(episode.support) == 16 and len(episode.query) == 16
    path = real_dir / "glue-sst2" / "glue-sst2_16_42_train.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for example, rec in zip(episode.support, raw, strict=True):
        assert example.options == ("negative", "positive")
        assert example.label == SST2_OPTIONS.index(rec["output"])
        assert example.input == rec["input"]
    assert {e.label for e in episode.support} == {0, 1}


def test_real_sst2_test_query(real_dir):
    first = data.load_episode("glue-sst2", 16, 42, query_split="test", max_query=50, data_dir=real_dir)
    again = data.load_episode("glue-sst2", 16, 42, query_split="test", max_query=50, data_dir=real_dir)
    other = data.load_episode("glue-sst2", 16, 13, query_split="test", max_query=50, data_dir=real_dir)
    assert len(first.query) == 50
    assert first.query == again.query
    assert first.query != other.query
    # Fallback: this build stores one <task>_test.jsonl, no per-(k, seed) test file.
    assert all("glue-sst2_test.jsonl:" in e.source for e in first.query)
    lines = [int(e.source.rsplit(":", 1)[1]) for e in first.query]
    assert lines == sorted(lines) and len(set(lines)) == 50
    assert len(data.load_examples("glue-sst2", "test", data_dir=real_dir)) == 872


def test_real_duplicate_options_are_reported(real_dir):
    path = real_dir / "commonsense_qa" / "commonsense_qa_16_13_train.jsonl"
    with pytest.raises(DataError, match="duplicate options \\['going away'\\]") as info:
        data.load_episode("commonsense_qa", 16, 13, data_dir=real_dir)
    assert f"{path}:5" in str(info.value)


def test_predict_inputs_may_leave_out_task_and_output(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('{"input": "great film", "options": ["negative", "positive"]}\n')
    (example,) = read_jsonl(path, unlabelled=True)
    assert example.input == "great film" and example.options == ("negative", "positive") and example.label == -1
    with pytest.raises(DataError, match=re.escape(f"{path}:1: missing key 'task'")):
        read_jsonl(path)  # a task file still needs it
