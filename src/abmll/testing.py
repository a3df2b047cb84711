"""Tiny random models built offline, for the test suite and the benchmarks' smoke runs (one
factory, so tests and benchmarks build the same model from the same arguments)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_tokenizer(pad: bool = True, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <eos>, id 256), no merges: no download needed.
    ``pad``: use <eos> as the pad token (False leaves it unset)."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>" if pad else None, padding_side=padding_side
    )


def tiny_llama(seed: int = 0, vocab_size: int = 257, hidden_size: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A random Llama in eval mode: ``layers`` decoder layers of width ``hidden_size`` (MLP
    2x, 4 heads, 2 KV heads), pad = eos = the last token id, no BOS; weights from
    ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()
