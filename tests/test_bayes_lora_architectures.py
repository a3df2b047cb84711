"""Gaussian LoRA beyond Llama: Qwen2, Gemma, GPT-2 (Conv1D) and OPT on tiny random configs;
target_modules presets; a clear error for layer types that cannot be adapted."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributions import Normal, kl_divergence
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from abmll.bayes_lora import BayesLoraConfig, BayesLoraModel
from abmll.gaussian_lora import std_matrix
from abmll.targets import preset_target_modules

V = 257


def make_tiny(arch: str, seed: int = 0) -> nn.Module:
    """A 2-layer random causal LM of ``arch`` (hidden 32) in eval mode."""
    torch.manual_seed(seed)
    if arch == "llama":
        return make_tiny_llama(seed)
    if arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        return Qwen2ForCausalLM(cfg).eval()
    if arch == "gemma":
        cfg = GemmaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return GemmaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=V - 1, eos_token_id=V - 1)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "opt":
        cfg = OPTConfig(
            vocab_size=V,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        )
        return OPTForCausalLM(cfg).eval()
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gemma", "gpt2", "opt"]
EXPECTED = {  # adapted layer names (without peft's base_model.model. prefix), d_in, d_out
    "llama": ([f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")], 32, None),
    "qwen2": ([f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")], 32, None),
    "gemma": ([f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")], 32, None),
    "gpt2": ([f"transformer.h.{i}.attn.c_attn" for i in range(2)], 32, 96),
    "opt": ([f"model.decoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")], 32, 32),
}


def random_params(model: BayesLoraModel, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in model.init_params().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_targets_use_the_architecture_preset(arch):
    model = BayesLoraModel(make_tiny(arch), BayesLoraConfig(rank=2, target_modules=["auto"]))
    names, d_in, d_out = EXPECTED[arch]
    assert sorted(L.name.removeprefix("base_model.model.") for L in model.layers) == sorted(names)
    assert model.config.target_modules == preset_target_modules(model.peft_model.config.model_type)
    assert all(L.d_in == d_in for L in model.layers)
    if d_out is not None:
        assert all(L.d_out == d_out for L in model.layers)
    for L in model.layers:  # scale pair shapes follow (d_out, r) / (r, d_in)
        params = model.init_params()
        assert params[L.scale_A].shape == (2, L.d_in) and params[L.scale_B].shape == (L.d_out, 2)
        assert params[L.mean_A].shape == (2, L.d_in) and params[L.mean_B].shape == (L.d_out, 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_posterior_mean_equals_plain_peft_lora(arch):
    base = make_tiny(arch)
    targets = preset_target_modules(base.config.model_type)
    plain = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    )
    model = BayesLoraModel(base, BayesLoraConfig(rank=2, alpha=4, target_modules=["auto"]))
    params = random_params(model, 1)
    copied = 0
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in params:
                p.copy_(params[name])
                copied += 1
    assert copied == len(model.mean_keys())
    ids = torch.tensor([[3, 50, 7, 21, 99], [4, 4, 8, 15, 16]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model(params, ids, mask).logits
        ref = plain(input_ids=ids, attention_mask=mask).logits
        zero = model(model.init_params(), ids, mask).logits
        sampled = model(params, ids, mask, sample=True).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert (ours - zero).abs().max() > 1e-4  # the random mean pair changes the output
    assert (sampled - ours).abs().max() > 1e-5  # and weight noise changes it again


@pytest.mark.parametrize("sampling,rows,calls", [("flipout", 16, 60), ("per_batch", 1, 1000)])
def test_gpt2_conv1d_sampled_moments_match_gaussian_weights(sampling, rows, calls):
    """Conv1D stores W0 as (d_in, d_out); the noise must still be x (S * E)^T with S (d_out, d_in)."""
    torch.manual_seed(0)
    model = BayesLoraModel(
        make_tiny("gpt2"), BayesLoraConfig(rank=2, init_std_factor=5.0, target_modules=["auto"], sampling=sampling)
    )
    params = random_params(model, 2, scale=0.5)
    L = model.layers[0]
    module = model.peft_model.get_submodule(L.name)
    w0, b0 = module.get_base_layer().weight.detach(), module.get_base_layer().bias.detach()
    assert w0.shape == (L.d_in, L.d_out) == (32, 96)
    captured = []
    handle = module.register_forward_hook(lambda m, a, out: captured.append((a[0].detach(), out.detach())))
    ids = torch.tensor([[5, 17, 99, 42]] * rows)
    with torch.no_grad():
        for _ in range(calls):
            model(params, ids, sample=True)
    handle.remove()
    x = captured[0][0][0]  # (seq, d_in), identical for all rows and calls
    outs = torch.cat([out for _, out in captured])  # (960 or 1000 samples, seq, d_out)
    M = L.scaling * params[L.mean_B] @ params[L.mean_A]  # (d_out, d_in)
    S = std_matrix(params[L.scale_B], params[L.scale_A], L.rho0)
    mean_ref = x @ w0 + b0 + x @ M.T
    var_ref = x.square() @ S.square().T
    n = outs.shape[0]
    assert ((outs.mean(0) - mean_ref).abs() <= 6 * (var_ref / n).sqrt() + 1e-5).all()
    ratio = outs.var(0) / var_ref
    assert abs(ratio.mean().item() - 1) < 0.05  # pooled over 384 entries
    torch.testing.assert_close(outs.var(0), var_ref, rtol=0.4, atol=1e-7)  # each entry (~1000 draws)


@pytest.mark.filterwarnings("ignore::UserWarning")  # peft: a tied layer adapted; mixed Conv1D / Linear targets
def test_per_batch_noise_on_a_tied_lm_head_stays_out_of_the_input_embedding():
    """GPT-2 ties lm_head to the token embedding (one tensor, two names): a sampled lm_head
    weight must replace lm_head's W0 only, not the embedding that shares it."""
    base = make_tiny("gpt2")
    assert base.lm_head.weight is base.transformer.wte.weight
    model = BayesLoraModel(
        base, BayesLoraConfig(rank=2, init_std_factor=5.0, target_modules=["c_attn", "lm_head"], sampling="per_batch")
    )
    params = random_params(model, 4, scale=0.5)
    embedded = []
    handle = model.peft_model.get_submodule("base_model.model.transformer.wte").register_forward_hook(
        lambda m, a, out: embedded.append(out.detach())
    )
    ids = torch.tensor([[5, 17, 99, 42]])
    with torch.no_grad():
        mean = model(params, ids).logits
        sampled = model(params, ids, sample=True).logits
    handle.remove()
    torch.testing.assert_close(embedded[1], embedded[0], rtol=0, atol=0)  # the embedding saw no noise
    assert (sampled - mean).abs().max() > 1e-3  # lm_head (and c_attn) did


def test_gpt2_kl_matches_torch_distributions():
    model = BayesLoraModel(make_tiny("gpt2"), BayesLoraConfig(rank=3, target_modules=["c_attn"], kl_chunk_elements=500))
    q, p = random_params(model, 3), random_params(model, 4)
    ref = 0.0
    for L in model.layers:
        Mq, Mp = (L.scaling * d[L.mean_B] @ d[L.mean_A] for d in (q, p))
        Sq, Sp = (std_matrix(d[L.scale_B], d[L.scale_A], L.rho0) for d in (q, p))
        assert Mq.shape == Sq.shape == (96, 32)
        ref = ref + kl_divergence(Normal(Mq, Sq), Normal(Mp, Sp)).sum()
    torch.testing.assert_close(model.kl(q, p), ref, rtol=1e-5, atol=1e-3)
    assert model.num_weight_entries() == 2 * 96 * 32


def test_explicit_targets_are_kept_and_config_untouched():
    config = BayesLoraConfig(rank=2, target_modules=["v_proj"])
    model = BayesLoraModel(make_tiny("qwen2"), config)
    assert model.config is config
    assert [L.name.rsplit(".", 1)[-1] for L in model.layers] == ["v_proj", "v_proj"]


@pytest.mark.parametrize(
    "arch, targets, name, kind",
    [
        ("llama", ["embed_tokens"], "model.embed_tokens", "Embedding"),
        ("gpt2", ["wte"], "transformer.wte", "Embedding"),
        ("llama", ["q_proj", "input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
        ("opt", ["self_attn"], "model.decoder.layers.0.self_attn", "OPTAttention"),
    ],
)
def test_unsupported_layer_type_names_the_module(arch, targets, name, kind):
    with pytest.raises(ValueError) as info:
        BayesLoraModel(make_tiny(arch), BayesLoraConfig(rank=2, target_modules=targets))
    message = str(info.value)
    assert repr(name) in message and kind in message and "Linear" in message


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(self.conv(x).mean((2, 3)))


def test_conv2d_target_is_refused_and_linear_works():
    with pytest.raises(ValueError, match=r"'conv' is a Conv2d"):
        BayesLoraModel(_ConvNet(), BayesLoraConfig(rank=2, target_modules=["conv"]))
    model = BayesLoraModel(_ConvNet(), BayesLoraConfig(rank=2, target_modules=["proj"]))
    assert [L.name for L in model.layers] == ["base_model.model.proj"]
    with pytest.raises(ValueError, match="model_type"):
        BayesLoraModel(_ConvNet(), BayesLoraConfig(rank=2, target_modules=["auto"]))


def test_presets_and_unmatched_hint():
    assert preset_target_modules("gpt2") == ["c_attn"]
    assert preset_target_modules("opt") == ["q_proj", "v_proj"]
    assert preset_target_modules("gpt_neox") == ["query_key_value"]  # peft's table as fallback
    with pytest.raises(ValueError, match="known: .*llama"):
        preset_target_modules("no-such-architecture")
    # Llama's default q_proj / v_proj do not exist in GPT-2: the error gives GPT-2's preset.
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj', 'v_proj'\].*\['c_attn'\]"):
        BayesLoraModel(make_tiny("gpt2"), BayesLoraConfig(rank=2))


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_option_scoring_works_for_each_architecture(arch):
    """abmll's default scoring packs an example's options after its prompt (4D attention mask,
    restarted position ids); every architecture must give the same probabilities as one
    sequence per option."""
    from conftest import make_tiny_tokenizer

    from abmll.data import Example
    from abmll.meta import predict_batches
    from abmll.scoring import ScoringConfig, make_batches

    tok = make_tiny_tokenizer()
    examples = [Example("hello there", ("no", "yes", "maybe"), 1), Example("a much longer input", ("x", "yz"), 0)]
    model = BayesLoraModel(make_tiny(arch), BayesLoraConfig(rank=2, target_modules=["auto"]))
    params = random_params(model, 6, scale=0.1)
    packed, _ = predict_batches(model, params, make_batches(tok, examples, ScoringConfig(pack_options=True)), 0)
    plain, _ = predict_batches(model, params, make_batches(tok, examples, ScoringConfig(pack_options=False)), 0)
    assert packed[1, 2] == 0 and packed[0].min() > 0
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-6)
