"""Top-L adaptation and the frozen-layer cache: the cached path gives the uncached path's loss
and gradients (1e-5) on every architecture, its keys separate what would change the cached
states, its size is bounded, and meta-training re-uses an episode's states."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_bayes_lora_architectures import ARCHS, make_tiny, random_params
from test_meta import TOK, rule_task, task_batches

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.gaussian_lora import HyperpriorConfig
from abmll.layer_cache import FrozenLayerCache
from abmll.meta import MetaConfig, meta_step, nll_backward
from abmll.scoring import ScoringConfig, make_batches


def grads_and_nll(model, params, batches, n_samples, seed=0):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch.manual_seed(seed)
    nll = nll_backward(model, leaves, batches, n_samples)
    return nll, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("n_samples", [0, 1])
def test_cached_path_gives_the_uncached_loss_and_gradients(arch, pack, n_samples):
    models = {
        mb: BayesLoraModel(make_tiny(arch), BayesLoraConfig(rank=2, target_modules=["auto"], top_layers=1, frozen_cache_mb=mb))
        for mb in (0, 64)
    }
    assert models[0].frozen_cache is None and models[64].frozen_cache.boundary == 1
    assert {L.name.split(".")[-3] for L in models[64].layers} == {"1"}
    params = random_params(models[0], seed=1)
    batches = make_batches(TOK, rule_task("t", 0, 10, "abcdefgh"), ScoringConfig(max_rows=6, pack_options=pack))
    ref_nll, ref_grad = grads_and_nll(models[0], params, batches, n_samples)
    for _ in range(2):  # a miss (capture, then replay), then a hit
        nll, grad = grads_and_nll(models[64], params, batches, n_samples)
        assert nll == pytest.approx(ref_nll, rel=1e-5, abs=1e-6)
        for k in ref_grad:
            torch.testing.assert_close(grad[k], ref_grad[k], rtol=1e-5, atol=1e-6)
    cache = models[64].frozen_cache
    assert cache.misses == len(batches) and cache.hits == len(batches) * (2 * max(n_samples, 1) - 1)


def test_top_layers_adapts_only_the_top_decoder_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=256,
        eos_token_id=256,
    )
    model = BayesLoraModel(LlamaForCausalLM(cfg).eval(), BayesLoraConfig(rank=2, top_layers=2))
    assert sorted({int(L.name.split(".")[4]) for L in model.layers}) == [3, 4]
    assert model.frozen_cache.boundary == 3
    assert model.num_weight_entries() == 2 * (32 * 32 + 16 * 32)  # 2 layers x (q 32x32, v 16x32: 2 KV heads)
    with pytest.raises(ValueError, match="top_layers=6 but the model has 5"):
        BayesLoraModel(LlamaForCausalLM(cfg).eval(), BayesLoraConfig(top_layers=6))
    with pytest.raises(ValueError, match="--top_layers must be an integer >= 0"):
        BayesLoraConfig(top_layers=-1)


def test_all_layers_adapted_means_no_cache():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=2))
    assert model.frozen_cache is None  # the lowest adapted layer is layer 0


def test_keys_separate_template_dtype_weights_and_boundary():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=1))
    cache = model.frozen_cache
    params = random_params(model, seed=0)
    ex = rule_task("t", 0, 4, "abcdefgh")
    a = make_batches(TOK, ex, ScoringConfig(max_rows=8))[0]
    b = make_batches(TOK, ex, ScoringConfig(max_rows=8, template="Q: {input}\nA:"))[0]
    run = lambda batch: model(params, batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)  # noqa: E731
    with torch.no_grad():
        run(a), run(a), run(b)
        assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)  # a changed template is new tokens
        embed = model.peft_model.get_input_embeddings().weight
        embed.add_(0.0)  # an in-place change of a frozen weight
        run(a)
        assert cache.misses == 3
        model.peft_model.to(torch.bfloat16)
        run(a)
        assert cache.misses == 4
        embed.data = embed.data.clone()  # a new tensor in place of a frozen weight
        run(a)
        assert cache.misses == 5
    assert cache.key(a.input_ids, a.attention_mask, a.position_ids)[0] == 1  # L in the key
    with pytest.raises(ValueError, match="boundary"):
        FrozenLayerCache(cache.layers, 0, model.peft_model, 1 << 20)


def test_a_layers_own_forward_is_restored_and_unkeyed_arguments_bypass_the_cache():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=1))
    params = random_params(model, seed=0)
    layer0 = model.frozen_cache.layers[0]
    calls = []
    original = layer0.forward

    def wrapped(*args, **kwargs):  # as accelerate's hooks wrap a layer's forward
        calls.append(1)
        return original(*args, **kwargs)

    layer0.forward = wrapped
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(params, ids)  # miss: capture, then replay
        model(params, ids)  # hit
        assert vars(layer0)["forward"] is wrapped and len(calls) == 1  # the capture ran it, replays did not
        out = model(params, ids, output_hidden_states=True)  # not in the key: every layer runs
        assert len(calls) == 2 and model.frozen_cache.hits == 1
        ref = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=1, frozen_cache_mb=0))
        torch.testing.assert_close(out.hidden_states[1], ref(params, ids, output_hidden_states=True).hidden_states[1])


def test_cache_size_is_bounded_and_least_recently_used_is_evicted():
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=1))
    params = random_params(model, seed=0)
    batches = make_batches(TOK, rule_task("t", 0, 12, "abcdefgh"), ScoringConfig(max_rows=2))
    sizes = []
    with torch.no_grad():
        for batch in batches:
            model(params, batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)
            sizes.append(model.frozen_cache.nbytes)
    one = sizes[0]
    bound = 3 * one + one // 2
    model.frozen_cache.clear()
    model.frozen_cache.max_bytes = bound
    misses = model.frozen_cache.misses
    with torch.no_grad():
        for batch in batches:
            model(params, batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)
            assert model.frozen_cache.nbytes <= bound
        assert len(model.frozen_cache) == 3
        last = batches[-1]
        model(params, last.input_ids, last.attention_mask, position_ids=last.position_ids)
        first = batches[0]
        model(params, first.input_ids, first.attention_mask, position_ids=first.position_ids)
    assert model.frozen_cache.hits == 1 and model.frozen_cache.misses - misses == len(batches) + 1


def test_meta_steps_reuse_the_episode_states_and_match_the_uncached_meta_gradient():
    tasks = [task_batches("a", 1), task_batches("b", 2)]
    grads = {}
    for mb in (0, 64):
        model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=1, frozen_cache_mb=mb))
        theta = {k: v.clone().requires_grad_() for k, v in random_params(model, seed=3, scale=0.2).items()}
        opt = torch.optim.SGD(theta.values(), lr=0.0)
        torch.manual_seed(0)
        for _ in range(2):
            meta_step(model, theta, opt, tasks, MetaConfig(inner_steps=3, inner_lr=0.1, n_samples=1), HyperpriorConfig())
        grads[mb] = {k: v.grad.clone() for k, v in theta.items()}
        if mb:
            n_batches = sum(len(t.support) + len(t.query) for t in tasks)
            assert model.frozen_cache.misses == n_batches  # every later forward is a hit
    for k in grads[0]:
        torch.testing.assert_close(grads[64][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_lm_head_gets_a_contiguous_input():
    """The LM head reads the last ``logits_to_keep`` positions, a strided slice; a contiguous copy
    lets F.linear run one matmul instead of a batched one against the weight expanded per row."""
    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2))
    seen = []
    model.peft_model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    batch = make_batches(TOK, rule_task("t", 0, 4, "abcdefgh"), ScoringConfig(max_rows=8))[0]
    with torch.no_grad():
        model(
            model.init_params(), batch.input_ids, batch.attention_mask, position_ids=batch.position_ids, logits_to_keep=batch.keep
        )
    assert seen == [True]


def test_memory_stays_flat_in_k_with_the_cache():
    """The autograd graph alive during a cached meta-step is one inner step's at most, whatever K,
    and the cache holds one entry per batch (filled once, without a graph)."""
    from test_meta import SavedTensorMeter, run_meta_step

    model = BayesLoraModel(make_tiny_llama(), BayesLoraConfig(rank=2, top_layers=1))
    task = task_batches("a", 5)
    peaks, sizes = {}, {}
    for K in (1, 8):
        theta = {k: v.clone().requires_grad_() for k, v in random_params(model, seed=0, scale=0.2).items()}
        meter = SavedTensorMeter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            run_meta_step(model, theta, [task], MetaConfig(inner_steps=K, inner_lr=0.1, n_samples=1), HyperpriorConfig())
        peaks[K], sizes[K] = meter.peak, model.frozen_cache.nbytes
    assert peaks[1] > 0 and peaks[8] <= 1.01 * peaks[1]
    assert sizes[8] == sizes[1] and len(model.frozen_cache) == len(task.support) + len(task.query)
