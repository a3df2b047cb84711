"""Option scoring against a per-option loop reference; truncation keeps the option tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.data import Example
from abmll.scoring import ScoringConfig, encode_options, make_batches, option_nll, option_scores

EXAMPLES = [
    Example("the movie was great", ("negative", "positive"), 1, "a.jsonl:1"),
    Example("which is a colour? a long question " * 3, ("red", "dog", "seventeen", "a b c d"), 2, "a.jsonl:2"),
    Example("x", ("yes", "no", "maybe"), 0, "a.jsonl:3"),
]


def reference_scores(model, tokenizer, examples, config):
    """One full forward per (example, option), no padding, sum of option-token log-probs."""
    out = torch.full((len(examples), 4), float("-inf"))
    for i, ex in enumerate(examples):
        prompt = tokenizer(config.template.format(input=ex.input))["input_ids"]
        for c, o in enumerate(ex.options):
            opt = tokenizer(config.option_prefix + o, add_special_tokens=False)["input_ids"]
            prompt_c = prompt[
                -(
                    config.max_length
                    - max(len(tokenizer(config.option_prefix + oo, add_special_tokens=False)["input_ids"]) for oo in ex.options)
                ) :
            ]
            ids = torch.tensor([prompt_c + opt])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            n = len(opt)
            total = logp[-n:].gather(-1, torch.tensor(opt).unsqueeze(-1)).sum()
            out[i, c] = total / n if config.length_normalize else total
    return out


def bayes_logits_fn(model, params, sample=False):
    return lambda groups=None, **kw: model(params, sample=sample, groups=groups, **kw).logits


@pytest.mark.parametrize("pack", [True, False])
def test_scores_match_per_option_loop(tiny_tokenizer, pack):
    base = make_tiny_llama()
    model = BayesLoraModel(base, BayesLoraConfig())
    params = model.init_params()
    for normalize in (False, True):
        config = ScoringConfig(length_normalize=normalize, pack_options=pack)
        batch = encode_options(tiny_tokenizer, EXAMPLES, config)
        with torch.no_grad():
            got = option_scores(bayes_logits_fn(model, params), batch)
            ref = reference_scores(base, tiny_tokenizer, EXAMPLES, config)
        assert got.shape == (3, 4)
        assert torch.isinf(got[0, 2:]).all() and torch.isinf(got[2, 3])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_truncation_keeps_option_tokens(tiny_tokenizer):
    base = make_tiny_llama()
    model = BayesLoraModel(base, BayesLoraConfig())
    config = ScoringConfig(max_length=24, pack_options=False)
    batch = encode_options(tiny_tokenizer, EXAMPLES, config)
    assert batch.input_ids.shape[1] <= 24
    # Every row ends with its full option; the prompt was cut from the left.
    for r in range(batch.input_ids.shape[0]):
        ex = EXAMPLES[batch.row_example[r]]
        opt = tiny_tokenizer(" " + ex.options[batch.row_option[r]], add_special_tokens=False)["input_ids"]
        assert batch.input_ids[r, -len(opt) :].tolist() == opt
    long_prompt = tiny_tokenizer(config.template.format(input=EXAMPLES[1].input))["input_ids"]
    row = batch.input_ids[3][batch.attention_mask[3].bool()].tolist()
    longest = len(tiny_tokenizer(" seventeen", add_special_tokens=False)["input_ids"])
    assert longest == 10  # byte-level: space + 9 letters
    assert row[: 24 - longest] == long_prompt[-(24 - longest) :]
    with torch.no_grad():
        ref = reference_scores(base, tiny_tokenizer, EXAMPLES, config)
        got = option_scores(bayes_logits_fn(model, model.init_params()), batch)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        packed = encode_options(tiny_tokenizer, EXAMPLES, ScoringConfig(max_length=24))
        assert packed.input_ids.shape[0] == 3  # one sequence per example
        got = option_scores(bayes_logits_fn(model, model.init_params()), packed)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_make_batches_respects_max_rows_and_keeps_order(tiny_tokenizer):
    config = ScoringConfig(max_rows=5)
    batches = make_batches(tiny_tokenizer, EXAMPLES, config)
    assert all(b.option_ids.shape[0] <= 5 for b in batches)
    assert sorted(i for b in batches for i in b.example_index.tolist()) == [0, 1, 2]
    for b in batches:
        for j, i in enumerate(b.example_index.tolist()):
            assert b.labels[j] == EXAMPLES[i].label


def test_option_nll_is_cross_entropy_over_present_options():
    scores = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 0.0, -1.0]])
    labels = torch.tensor([1, 2])
    ref = torch.stack(
        [
            torch.nn.functional.cross_entropy(torch.tensor([[0.0, 1.0]]), torch.tensor([1])),
            torch.nn.functional.cross_entropy(scores[1:], labels[1:]),
        ]
    )
    torch.testing.assert_close(option_nll(scores, labels), ref)


@pytest.mark.parametrize("pack", [True, False])
def test_sampled_scores_share_one_weight_sample_per_example(tiny_tokenizer, pack):
    # With groups = row_example, duplicating an example's option gives identical scores under sampling.
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(init_std_factor=2.0))
    ex = Example("same options", ("yes", "yes"), 0)
    batch = encode_options(tiny_tokenizer, [ex, ex], ScoringConfig(pack_options=pack))
    with torch.no_grad():
        s = option_scores(bayes_logits_fn(model, model.init_params(), sample=True), batch)
    torch.testing.assert_close(s[:, 0], s[:, 1])
    assert (s[0] - s[1]).abs().max() > 1e-5
