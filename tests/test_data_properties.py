"""Property-based tests (hypothesis) of the data layer, from the JSON line to the option scores.

Documented behaviours checked here:
- Every bad record (malformed JSON, not UTF-8, not an object, a wrong type, duplicate options,
  an answer missing from the options) is a ``DataError`` naming ``path:line``.
- Empty strings are valid data: an empty input gives a prompt of the template alone; an empty
  option is scored as the option prefix. An option that tokenises to nothing (empty with an
  empty ``option_prefix``) is a ``ValueError`` naming the record.
- Any unicode (emoji, CJK, line separators) round-trips exactly through reading and tokenising.
- A long prompt is cut from the left so that it and the example's longest option fit in
  ``max_length``; every option is kept whole and scored exactly as on its own; an option that
  cannot fit is a ``ValueError`` naming the record, never an error from inside torch.
- k larger than the examples available: ``load_episode`` returns what the (k, seed) files hold
  (fewer than k examples, in file order, no padding or repetition); a k without files is a
  ``MissingTaskError`` naming the expected path.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, option_key, readable_option, write_task
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.data import DataError, Example, MissingTaskError, load_episode, read_jsonl
from abmll.scoring import ScoringConfig, encode_options, option_scores

KEYS = ["task", "input", "output", "options"]
TOKENIZER = make_tiny_tokenizer()
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

unicode_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12) | st.text(
    alphabet='😀🎉👍🏽🇫🇷ñ中文\u2028\u0085\r\n\t"\\{} ', max_size=12
)
long_text = st.builds(lambda part, times: part * times, unicode_text.filter(bool), st.integers(1, 400))


def record(input="x", output="a", options=("a", "b"), task="t") -> dict:
    return {"task": task, "input": input, "output": output, "options": list(options)}


def write(folder, lines: list) -> str:
    """JSON-lines file from dicts (dumped, non-ASCII kept) and bytes (written verbatim)."""
    path = folder / "f.jsonl"
    raw = [x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


def data_error(path: str, line: int) -> str:
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    return message


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))


pytestmark = pytest.mark.usefixtures("one_thread")  # other jobs share the 2 cores


# ---------------------------------------------------------------- bad records


def wrong_value(key: str):
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    if key == "options":  # not a list, or a list holding a non-string
        return (
            scalars
            | st.text(max_size=5)
            | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
            | st.lists(st.text(max_size=3), max_size=2).flatmap(lambda good: scalars.map(lambda bad: good + [bad]))
        )
    return scalars | st.lists(st.text(max_size=3), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


@SETTINGS
@given(key_value=st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), wrong_value(k))), n_good=st.integers(0, 3))
def test_wrong_type_names_key_and_line(tmp_path_factory, key_value, n_good):
    key, value = key_value
    path = write(tmp_path_factory.mktemp("type"), [record()] * n_good + [{**record(), key: value}])
    message = data_error(path, n_good + 1)
    assert repr(key) in message and ("must be list" in message or "must be str" in message or "list of strings" in message)


malformed_lines = st.one_of(
    st.integers(1, 40).map(lambda cut: json.dumps(record("an input", "b")).encode()[:cut]),  # cut short
    st.sampled_from([b"[1, 2]", b"3", b'"text"', b"null", b"NaN"]),  # not an object
    st.binary(min_size=1, max_size=10).map(lambda b: b'{"input": "' + b"\xff" + b + b'"}'),  # not UTF-8
)


@SETTINGS
@given(bad=malformed_lines, n_good=st.integers(0, 3), blank_lines=st.integers(0, 2))
def test_malformed_line_names_file_and_line(tmp_path_factory, bad, n_good, blank_lines):
    lines = [record()] * n_good + [b""] * blank_lines + [bad]
    message = data_error(write(tmp_path_factory.mktemp("bad"), lines), n_good + blank_lines + 1)
    assert any(why in message for why in ("malformed JSON", "expected a JSON object", "not UTF-8"))


@SETTINGS
@given(options=st.lists(unicode_text.filter(readable_option), min_size=1, max_size=5, unique_by=option_key), data=st.data())
def test_duplicate_options_are_refused(tmp_path_factory, options, data):
    twice = data.draw(st.sampled_from(options))
    bad = record("q", options[0], options + [twice])
    message = data_error(write(tmp_path_factory.mktemp("dup"), [record(), bad]), 2)
    assert f"duplicate options {[twice]}" in message


# ---------------------------------------------------------------- valid records, end to end


def reference_prompt(example: Example, config: ScoringConfig, room: int) -> list[int] | None:
    """The prompt by brute force: the template around the longest non-empty suffix of the input
    (cut at a character) whose prompt fits in ``room`` tokens; None when none fits."""
    head, _, tail = config.template.partition("{input}")
    for start in range(max(1, len(example.input))):
        ids = TOKENIZER(head + example.input[start:] + tail, add_special_tokens=False)["input_ids"]
        if len(ids) <= room:
            return ids
    return None


def reference_scores(model, example: Example, config: ScoringConfig) -> list[float]:
    """Each option scored on its own after :func:`reference_prompt`: its summed token log-probabilities."""
    params = model.init_params()
    options = [TOKENIZER(config.option_prefix + o, add_special_tokens=False)["input_ids"] for o in example.options]
    prompt = reference_prompt(example, config, config.max_length - max(map(len, options)))
    scores = []
    for option in options:
        with torch.no_grad():
            logits = model(params, input_ids=torch.tensor([prompt + option])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)
        scores.append(logp.gather(-1, torch.tensor(option)[:, None]).sum().item())
    return scores


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    input=unicode_text | long_text,
    max_length=st.sampled_from([48, 128]),
    options=st.lists(
        (unicode_text | long_text.map(lambda s: s[:40])).filter(readable_option), min_size=2, max_size=4, unique_by=option_key
    ),
    data=st.data(),
)
def test_any_valid_record_is_read_tokenised_and_scored(tmp_path_factory, model, input, max_length, options, data):
    output = data.draw(st.sampled_from(options))
    path = write(tmp_path_factory.mktemp("ok"), [record(input, output, options)])
    (example,) = read_jsonl(path)
    assert (example.input, example.options, example.options[example.label]) == (input, tuple(options), output)

    config = ScoringConfig(max_length=max_length)
    option_ids = [TOKENIZER(" " + o, add_special_tokens=False)["input_ids"] for o in options]
    if max(map(len, option_ids)) >= max_length:  # no room left for even one prompt token
        event("an option does not fit max_length")
        with pytest.raises(ValueError, match=f"{path}:1.*does not fit max_length={max_length}"):
            encode_options(TOKENIZER, [example], config)
        return
    prompt_len = len(TOKENIZER(config.template.format(input=input))["input_ids"])
    if reference_prompt(example, config, max_length - max(map(len, option_ids))) is None:
        event("the template alone does not fit")  # refused: the prompt would hold none of the input
        with pytest.raises(ValueError, match=f"{path}:1.*no room for the input"):
            encode_options(TOKENIZER, [example], config)
        return
    event("input cut from the left" if prompt_len + max(map(len, option_ids)) > max_length else "prompt kept whole")
    batch = encode_options(TOKENIZER, [example], config)
    for r in range(len(options)):  # every option kept whole, decodes to itself
        kept = batch.option_ids[r][batch.option_mask[r]].tolist()
        assert kept == option_ids[batch.row_option[r]]
        assert TOKENIZER.decode(kept) == " " + options[batch.row_option[r]]
    with torch.no_grad():
        got = option_scores(lambda groups=None, **kw: model(model.init_params(), groups=groups, **kw).logits, batch)
    torch.testing.assert_close(got[0], torch.tensor(reference_scores(model, example, config)), atol=1e-4, rtol=1e-4)


def test_an_empty_input_is_valid_but_an_empty_option_is_refused(tmp_path, model):
    path = write(tmp_path, [record("", "a", ["a", "b"], task="")])
    (example,) = read_jsonl(path)
    assert example == Example("", ("a", "b"), 0, f"{path}:1")
    with pytest.raises(DataError, match=f"{path}:1: option 0 is empty"):
        read_jsonl(write(tmp_path, [record("", "", ["", "b"], task="")]))
    example = Example("", ("", "b"), 0, "built:1")  # built in Python, not read
    batch = encode_options(TOKENIZER, [example], ScoringConfig())
    assert batch.option_mask.sum(1).tolist() == [1, 2]  # " " and " b"
    with pytest.raises(ValueError, match="built:1.*tokenises to nothing"):
        encode_options(TOKENIZER, [example], ScoringConfig(option_prefix=""))


# ---------------------------------------------------------------- k larger than the examples available


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 15))
def test_k_larger_than_the_file_gives_what_the_file_holds(tmp_path_factory, n):
    root = tmp_path_factory.mktemp("k")
    rows = [(f"x{i}", "yes" if i % 2 else "no") for i in range(n)]
    write_task(root, "t", {"16_1_train": rows, "16_1_dev": rows[:1]})
    episode = load_episode("t", k=16, seed=1, data_dir=root)
    assert [e.input for e in episode.support] == [x for x, _ in rows]
    assert [e.label for e in episode.support] == [int(y == "yes") for _, y in rows]
    with pytest.raises(MissingTaskError, match=f"no train file \\(expected {root / 't' / 't_32_1_train.jsonl'}\\)"):
        load_episode("t", k=32, seed=1, data_dir=root)


# ---------------------------------------------------------------- text the tokenizer cannot take


def test_lone_surrogate_is_a_data_error(tmp_path):
    path = write(tmp_path, [record(), b'{"task": "t", "input": "a\\ud800b", "output": "a", "options": ["a", "b"]}'])
    data_error(path, 2)


def test_empty_prompt_is_refused(tmp_path):
    (example,) = read_jsonl(write(tmp_path, [record("", "a")]))
    with pytest.raises(ValueError, match=f"{tmp_path}.*prompt"):
        encode_options(TOKENIZER, [example], ScoringConfig(template="{input}"))
