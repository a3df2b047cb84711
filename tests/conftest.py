"""Shared fixtures: tiny random models and a byte-level tokenizer, built offline."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def make_tiny_tokenizer(pad: bool = True, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <eos>), no merges: no download needed.
    ``pad``: use <eos> as the pad token (False leaves it unset)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>" if pad else None,
                                   padding_side=padding_side)


def make_tiny_llama(seed: int = 0, vocab_size: int = 257) -> LlamaForCausalLM:
    """A 2-layer random Llama (hidden 32, 4 heads, 2 KV heads) in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()
