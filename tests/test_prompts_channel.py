"""Noisy-channel scoring (MetaICL): score_c = log p(input | option c), packed and unpacked,
against a per-option loop that tokenises each option-then-input text as written."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_prompts_special_tokens import sentencepiece_tokenizer

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.data import Example
from abmll.scoring import ScoringConfig, encode_options, make_batches, option_nll, option_scores, training_loss
from abmll.testing import tiny_tokenizer

EXAMPLES = [
    Example("the movie was great", ("negative", "positive"), 1, "a.jsonl:1"),
    Example("which is a colour? a long question " * 3, ("red", "dog", "seventeen", "a b c d"), 2, "a.jsonl:2"),
    Example("x", ("yes", "no", "maybe"), 0, "a.jsonl:3"),
]


def reference_channel_scores(model, tok, examples, template, max_length, normalize):
    """One forward per (example, option) over [special tokens] + tok(option text + input),
    summing the log-probabilities of the tokens past those of the option text without its
    trailing blanks (the last ``room`` of them, room = max_length - special tokens - the
    longest such option text)."""
    out = torch.full((len(examples), 4), float("-inf"))
    before, after = template.split("{input}")
    special = tok("a")["input_ids"][: -len(tok("a", add_special_tokens=False)["input_ids"])]
    for i, ex in enumerate(examples):
        conds = [tok(before.format(option=o).rstrip(" "), add_special_tokens=False)["input_ids"] for o in ex.options]
        room = max_length - len(special) - max(len(c) for c in conds)
        for c, o in enumerate(ex.options):
            whole = tok(before.format(option=o) + ex.input + after, add_special_tokens=False)["input_ids"]
            scored = whole[len(conds[c]) :][-room:]
            ids = torch.tensor([special + conds[c] + scored])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            total = logp[-len(scored) :].gather(-1, torch.tensor(scored).unsqueeze(-1)).sum()
            out[i, c] = total / len(scored) if normalize else total
    return out


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("tokenizer", [tiny_tokenizer, sentencepiece_tokenizer])
@pytest.mark.parametrize("template,max_length", [("{option}\n{input}", 256), ("Label: {option}\nText: {input}", 40)])
def test_channel_scores_match_a_per_option_loop(pack, tokenizer, template, max_length):
    tok = tokenizer()
    examples = EXAMPLES  # the SentencePiece-style vocabulary has no '?': left out there
    if tokenizer is sentencepiece_tokenizer:
        examples = [Example(e.input.replace("?", ""), e.options, e.label, e.source) for e in EXAMPLES]
    base = make_tiny_llama()
    model = BayesLoraModel(base, BayesLoraConfig())
    params = model.init_params()
    for normalize in (False, True):
        config = ScoringConfig(
            channel=True, channel_template=template, max_length=max_length, length_normalize=normalize, pack_options=pack
        )
        batch = encode_options(tok, examples, config)
        with torch.no_grad():
            got = option_scores(lambda groups=None, **kw: model(params, groups=groups, **kw).logits, batch)
            ref = reference_channel_scores(base, tok, examples, template, max_length, normalize)
        assert torch.isinf(got[0, 2:]).all() and torch.isinf(got[2, 3]) and torch.isfinite(got[1]).all()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        if max_length == 40:  # the long input was cut from the left, the shortest not
            assert batch.dropped_tokens[1] > 0 and batch.dropped_tokens[2] == 0


def test_channel_packing_scores_each_example_in_one_row():
    batch = encode_options(tiny_tokenizer(), EXAMPLES, ScoringConfig(channel=True))
    assert batch.input_ids.shape[0] == len(EXAMPLES) and batch.option_seq.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_training_loss_is_the_channel_generative_loss_or_the_softmax_nll():
    scores = torch.tensor([[-30.0, -20.0, float("-inf")], [-5.0, -6.0, -7.0]])
    labels = torch.tensor([1, 2])
    batches = {
        loss: make_batches(tiny_tokenizer(), EXAMPLES[:1], ScoringConfig(channel=True, channel_loss=loss))[0]
        for loss in ("generative", "softmax")
    }
    for batch in batches.values():
        batch.labels = labels
    torch.testing.assert_close(training_loss(scores, batches["generative"]), torch.tensor([20.0, 7.0]))
    torch.testing.assert_close(training_loss(scores, batches["softmax"]), option_nll(scores, labels))
    direct = make_batches(tiny_tokenizer(), EXAMPLES[:1], ScoringConfig(channel_loss="generative"))[0]
    direct.labels = labels
    torch.testing.assert_close(training_loss(scores, direct), option_nll(scores, labels))  # direct: always softmax


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channel_template": "{input}\n{option}"}, "option.*once, then"),
        ({"channel_template": "{option}\n"}, "option.*once, then"),
        ({"channel_template": "{option} {option}\n{input}"}, "option.*once, then"),
        ({"channel_template": "{label}\n{input}"}, "only the fields"),
        ({"channel": True, "chat_template": True}, "--channel and --chat_template"),
        ({"channel_loss": "mse"}, "channel_loss"),
    ],
)
def test_bad_channel_settings_are_refused_naming_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoringConfig(**kwargs)


def test_an_input_that_does_not_fit_after_the_longest_option_is_refused_naming_its_line():
    with pytest.raises(ValueError, match="a.jsonl:2.*max_length"):
        encode_options(tiny_tokenizer(), EXAMPLES, ScoringConfig(channel=True, max_length=10))
