"""In-context demonstrations (``ScoringConfig.demonstrations``): m support examples written
before the prompt, never the example scored, as many as fit ``max_length`` without cutting
the input; direct and channel scoring, packed and unpacked."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.data import Example
from abmll.scoring import ScoringConfig, encode_options, make_batches, option_scores
from abmll.testing import tiny_tokenizer

SUPPORT = [
    Example("good film", ("bad", "good"), 1, "s.jsonl:1"),
    Example("awful plot", ("bad", "good"), 0, "s.jsonl:2"),
    Example("fine {acting}", ("bad", "good"), 1, "s.jsonl:3"),
]
QUERY = [Example("a great movie", ("bad", "good"), 1, "q.jsonl:1"), SUPPORT[0]]


def row_texts(config, examples, pool):
    """The text of each example's first option row (unpacked), and the batch."""
    tok = tiny_tokenizer()
    batch = encode_options(tok, examples, ScoringConfig(**{**vars(config), "pack_options": False}), demonstrations=pool)
    first = [int((batch.row_example == i).nonzero()[0]) for i in range(len(examples))]
    return [tok.decode(batch.input_ids[r][batch.attention_mask[r].bool()]) for r in first], batch


def test_direct_prompts_hold_the_first_m_support_examples_but_never_their_own():
    config = ScoringConfig(template="Review: {input}\nSentiment:", demonstrations=2)
    texts, batch = row_texts(config, QUERY, SUPPORT)
    demo = "Review: good film\nSentiment: good\n\nReview: awful plot\nSentiment: bad\n\n"
    assert texts[0] == demo + "Review: a great movie\nSentiment: bad"
    # a support example scored in its own support set: the next ones stand in for it
    other = "Review: awful plot\nSentiment: bad\n\nReview: fine {acting}\nSentiment: good\n\n"
    assert texts[1] == other + "Review: good film\nSentiment: bad"
    assert batch.demonstrations.tolist() == [2, 2] and batch.dropped_tokens.tolist() == [0, 0]


def test_channel_prompts_hold_demonstrations_in_channel_form():
    config = ScoringConfig(channel=True, channel_template="{option}\n{input}", demonstrations=1)
    texts, _ = row_texts(config, QUERY[:1], SUPPORT)
    assert texts[0] == "good\ngood film\n\nbad\na great movie"


@pytest.mark.parametrize("channel", [False, True])
def test_as_many_demonstrations_as_fit_without_cutting_the_input(channel):
    base = ScoringConfig(channel=channel, template="{input}\nA:", demonstrations=3)
    used = []
    for max_length in range(12, 120):
        _, batch = row_texts(ScoringConfig(**{**vars(base), "max_length": max_length}), QUERY[:1], SUPPORT)
        used.append(int(batch.demonstrations[0]))
        if used[-1]:
            assert batch.dropped_tokens[0] == 0  # demonstrations only where the input stays whole
            texts, _ = row_texts(ScoringConfig(**{**vars(base), "max_length": max_length}), QUERY[:1], SUPPORT)
            assert len(texts[0]) <= max_length  # the byte tokenizer: one token per character
    assert used[0] == 0 and used[-1] == 3 and used == sorted(used) and set(used) == {0, 1, 2, 3}


@pytest.mark.parametrize("channel", [False, True])
def test_demonstration_scores_are_the_same_packed_and_unpacked(channel):
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig())
    params = model.init_params()
    scores = []
    for pack in (True, False):
        config = ScoringConfig(channel=channel, demonstrations=2, pack_options=pack, max_rows=4)
        batches = make_batches(tiny_tokenizer(), QUERY, config, SUPPORT)
        with torch.no_grad():
            got = torch.zeros(len(QUERY), 2)
            for b in batches:
                got[b.example_index] = option_scores(lambda groups=None, **kw: model(params, groups=groups, **kw).logits, b)
        scores.append(got)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


def test_demonstrations_without_a_support_set_are_refused():
    with pytest.raises(ValueError, match="--demonstrations needs the task's support set"):
        make_batches(tiny_tokenizer(), QUERY, ScoringConfig(demonstrations=2))
    with pytest.raises(ValueError, match="demonstrations"):
        ScoringConfig(demonstrations=-1)


def test_episodes_draw_demonstrations_from_their_support_set(tiny_data_dir):
    """Meta-training, validation and evaluate build episodes here: support and query prompts
    hold the support's first examples, and a support example never itself."""
    from abmll.config import TaskArgs
    from abmll.data import load_episode
    from abmll.episodes import episode_batches

    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig())
    tasks = TaskArgs(data_dir=str(tiny_data_dir), k=4)
    scoring = ScoringConfig(demonstrations=2, pack_options=False)
    ep = episode_batches(model, tiny_tokenizer(), "h0", 1, tasks, scoring, "test", None)
    raw = load_episode("h0", 4, 1, "test", None, str(tiny_data_dir))
    tok = tiny_tokenizer()
    for batches, examples in ((ep.support, raw.support), (ep.query, raw.query)):
        for b in batches:
            assert b.demonstrations.tolist() == [2] * b.num_examples
            for r in range(b.option_seq.shape[0]):
                text = tok.decode(b.input_ids[r][b.attention_mask[r].bool()])
                ex = examples[int(b.example_index[b.row_example[r]])]
                expected = [d for d in raw.support if d.input != ex.input][:2]
                demo_part = "".join(f"{d.input}\nAnswer: {d.options[d.label]}\n\n" for d in expected)
                assert text.startswith(demo_part + ex.input + "\nAnswer:")


def test_demonstrations_are_written_as_their_text_is():
    """A demonstration's text is data, not a template: its braces and a literal backslash-n
    stay as they are (the escapes of typed flags apply to settings, not to examples)."""
    pool = [Example("path C:\\new {x}", ("bad", "good"), 1, "s.jsonl:1")]
    texts, _ = row_texts(ScoringConfig(template="{input}\nA:", demonstrations=1), QUERY[:1], pool)
    assert texts[0].startswith("path C:\\new {x}\nA: good\n\n")
