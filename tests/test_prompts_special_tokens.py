"""Special tokens on every tokenizer family abmll has presets for: exactly one BOS where the
tokenizer adds one (never two, never lost to truncation), none where it adds none, on every
code path (packed and unpacked, truncated and not, plain template and chat template).
The tokenizers are tiny offline byte-level ones with each family's post-processor."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from abmll.data import Example
from abmll.prompts import prompt_parts, tokenize_prompt
from abmll.scoring import ScoringConfig, make_batches

LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2_CHAT = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"

# family: (special tokens, the token the tokenizer puts first or None, bos, eos, pad, chat template)
FAMILIES = {
    "llama2": (["<s>", "</s>", "<unk>"], "<s>", "<s>", "</s>", "<unk>", LLAMA2_CHAT),
    "llama3": (
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "<|begin_of_text|>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
        LLAMA3_CHAT,
    ),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, None, "<|im_end|>", "<|endoftext|>", QWEN_CHAT),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<bos>", "<eos>", "<pad>", GEMMA_CHAT),
    "gpt2": (["<|endoftext|>"], None, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", None),
    "opt": (["<pad>", "</s>"], "</s>", "</s>", "</s>", "<pad>", None),  # OPT prepends </s>, its BOS
}


def family_tokenizer(family: str) -> PreTrainedTokenizerFast:
    specials, first, bos, eos, pad, chat = FAMILIES[family]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in specials:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(specials)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if first is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{first} $A", pair=f"{first} $A {first} $B", special_tokens=[(first, vocab[first])]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad)
    if chat:
        tok.chat_template = chat
    return tok


def examples(long: bool) -> list[Example]:
    text = "word " * (300 if long else 3)
    return [Example(text + str(i), ("no", "yes", "maybe"), i % 3, f"f.jsonl:{i + 1}") for i in range(4)]


def real_start(batch, s: int, packed: bool) -> int:
    """Index of sequence ``s``'s first real (non-pad) token."""
    if packed:  # the last row is an option token: it attends to the whole prompt
        return int((batch.attention_mask[s, 0, -1] == 0).nonzero().min())
    return int(batch.attention_mask[s].argmax())


CASES = [
    (f, packed, long, chat)
    for f in FAMILIES
    for packed in (True, False)
    for long in (False, True)
    for chat in (False, True)
    if not (chat and FAMILIES[f][5] is None)
]


@pytest.mark.parametrize("family,packed,long,chat", CASES)
def test_exactly_one_bos_first_where_the_tokenizer_adds_one(family, packed, long, chat):
    tok = family_tokenizer(family)
    first = FAMILIES[family][1]
    first_id = tok.convert_tokens_to_ids(first) if first else None
    cfg = ScoringConfig(max_length=64, max_rows=6, pack_options=packed, chat_template=chat)
    batches = make_batches(tok, examples(long), cfg)
    if chat and family != "qwen2":
        first_id = tok.bos_token_id  # chat templates above start with the BOS
    for batch in batches:
        for s in range(batch.input_ids.shape[0]):
            start = real_start(batch, s, packed)
            row = batch.input_ids[s, start:].tolist()
            if first_id is None:
                assert tok.bos_token_id is None or family == "gpt2" or row[0] != tok.bos_token_id
                if family == "gpt2":
                    assert tok.bos_token_id not in row
            else:
                assert row[0] == first_id, (family, row[:5])
                assert row.count(first_id) == 1, (family, row[:5])


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f][5] is not None])
def test_chat_template_puts_the_input_in_the_user_turn_and_options_after_the_generation_prompt(family):
    tok = family_tokenizer(family)
    cfg = ScoringConfig(template="Q: {input}", chat_template=True, max_length=256)
    parts = prompt_parts(tok, cfg)
    ids, cut = tokenize_prompt(tok, parts, "hello", 200)
    expected = tok.apply_chat_template([{"role": "user", "content": "Q: hello"}], add_generation_prompt=True, tokenize=False)
    assert cut == 0 and tok.decode(ids) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncation_cuts_the_input_keeps_template_and_specials(family):
    tok = family_tokenizer(family)
    parts = prompt_parts(tok, ScoringConfig(template="Review: {input}\nAnswer:"))
    ids, cut = tokenize_prompt(tok, parts, "abcdefghij" * 10, 40)
    assert len(ids) == 40 and cut == 100 - (40 - len(parts.prefix) - len("Review: ") - len("\nAnswer:"))
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith("Review: ") and text.endswith("abcdefghij\nAnswer:")
    assert tuple(ids[: len(parts.prefix)]) == parts.prefix


def test_template_without_input_or_with_an_unknown_field_is_refused():
    tok = family_tokenizer("llama3")
    with pytest.raises(ValueError, match="no \\{input\\} field"):
        prompt_parts(tok, ScoringConfig(template="Answer:"))
    with pytest.raises(ValueError, match="only the field \\{input\\}"):
        prompt_parts(tok, ScoringConfig(template="{inputs}"))
    with pytest.raises(ValueError, match="no chat template"):
        prompt_parts(family_tokenizer("gpt2"), ScoringConfig(chat_template=True))


def test_a_bos_written_in_the_text_is_not_doubled():
    tok = family_tokenizer("llama2")
    parts = prompt_parts(tok, ScoringConfig(template="<s>{input}"))
    ids, _ = tokenize_prompt(tok, parts, "hi", 50)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert torch.tensor(ids).numel() == 1 + len("hi")


def sentencepiece_tokenizer(eos_suffix: bool = False) -> PreTrainedTokenizerFast:
    """Llama-2 (legacy SentencePiece) style: a '▁' is prepended to every encoded text, and
    optionally an EOS appended (as some tokenizers do)."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:\n") | {"▁"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<s>", "</s>", "<unk>"])
    single = "<s> $A </s>" if eos_suffix else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_cut_prompt_is_tokenised_as_an_uncut_one_on_sentencepiece_tokenizers():
    tok = sentencepiece_tokenizer()
    parts = prompt_parts(tok, ScoringConfig(template="Review: {input}\nAnswer:"))
    full, _ = tokenize_prompt(tok, parts, "abcdefghij" * 10, 10_000)
    cut, n = tokenize_prompt(tok, parts, "abcdefghij" * 10, 40)
    assert len(cut) <= 40 and n > 0 and cut[0] == tok.bos_token_id
    assert cut[-9:] == full[-9:]  # the template's tail, tokenised as in the uncut prompt
    assert cut[1:4] == full[1:4]  # and its head


def test_an_eos_appended_by_the_tokenizer_never_sits_between_prompt_and_answer():
    tok = sentencepiece_tokenizer(eos_suffix=True)
    for pack in (True, False):
        batch = make_batches(
            tok, [Example("abc", ("yes", "no"), 0, "f:1")], ScoringConfig(template="{input}\nAnswer:", pack_options=pack)
        )[0]
        row = batch.input_ids[0].tolist()
        assert tok.eos_token_id not in row and row.count(tok.bos_token_id) == 1
