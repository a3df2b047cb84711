"""An example's option probabilities do not depend on which examples share its batch, on the
padding that they bring, or on the layout (fp32: within 1e-5)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_llama
from test_bayes_lora_architectures import random_params
from test_meta import TOK

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.data import Example
from abmll.meta import predict_batches
from abmll.scoring import ScoringConfig, make_batches


def mixed_examples(n: int = 9) -> list[Example]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        text = " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 12)))
        options = ("no", "yes") if i % 3 else ("red", "green", "a much longer option")
        out.append(Example(text, options, i % len(options), f"f:{i}"))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_probabilities_do_not_depend_on_batch_companions_or_padding(pack):
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    params = random_params(model, seed=2)
    exs = mixed_examples()
    alone = torch.cat(
        [
            predict_batches(model, params, make_batches(TOK, [e], ScoringConfig(pack_options=pack)))[0][:, :3]
            if len(e.options) == 3
            else torch.nn.functional.pad(
                predict_batches(model, params, make_batches(TOK, [e], ScoringConfig(pack_options=pack)))[0], (0, 1)
            )
            for e in exs
        ]
    )
    for max_rows in (4, 7, 64):
        for order in (list(range(len(exs))), list(reversed(range(len(exs))))):
            batches = make_batches(TOK, [exs[i] for i in order], ScoringConfig(max_rows=max_rows, pack_options=pack))
            probs, _ = predict_batches(model, params, batches)
            back = torch.empty_like(probs)
            back[torch.tensor(order)] = probs
            torch.testing.assert_close(back, alone, rtol=0, atol=1e-5)


def test_packed_and_unpacked_layouts_agree():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    params = random_params(model, seed=3)
    exs = mixed_examples()
    packed, _ = predict_batches(model, params, make_batches(TOK, exs, ScoringConfig(max_rows=8, pack_options=True)))
    plain, _ = predict_batches(model, params, make_batches(TOK, exs, ScoringConfig(max_rows=8, pack_options=False)))
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5)
