"""Prompts are scored as written: the tokens of a scored row (prompt, then an option; or in
channel mode an option, then the input) are those of the whole text, whatever whitespace sits
at the boundary, on byte-level BPE with merges, SentencePiece-style and byte tokenizers."""

from __future__ import annotations

import pytest
from test_prompts_special_tokens import sentencepiece_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from abmll.data import Example
from abmll.scoring import ScoringConfig, encode_options
from abmll.testing import tiny_tokenizer

CORPUS = ["Answer: yes", "Answer: no", "Answer:\tyes", "the answer is yes or no", "Label: positive negative"] * 50


def merging_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with merges (' yes', 'Answer', ...), trained here offline."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


TOKENIZERS = {"bpe-merges": merging_bpe, "sentencepiece": sentencepiece_tokenizer, "bytes": tiny_tokenizer}
ENDINGS = ["Answer:", "Answer: ", "Answer:\t", "Answer:\n", "Answer:  ", "Answer: \n"]
PREFIXES = [" ", "", "\n", "  "]


def rows(tok, config, ex):
    """Each option's unpacked row (real tokens only) and the number of its scored tokens."""
    batch = encode_options(tok, [ex], ScoringConfig(**{**vars(config), "pack_options": False}))
    out = []
    for r in range(len(ex.options)):
        ids = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        out.append((ids, int(batch.option_mask[r].sum())))
    return out


def text_of(tok, ids) -> str:
    """The text of ``ids``, blanks kept (a SentencePiece decoder drops the '▁' of some tokens)."""
    return "".join(tok.convert_ids_to_tokens(ids)).replace("▁", " ") if "▁" in tok.get_vocab() else tok.decode(ids)


def whole(tok, text):
    """``text`` tokenised in one piece with the tokenizer's own leading special tokens."""
    plain = tok(text, add_special_tokens=False)["input_ids"]
    full = tok(text)["input_ids"]
    return full[: len(full) - len(plain)] if full[-len(plain) :] == plain else [], plain


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_direct_rows_are_the_text_as_written(name, ending, prefix):
    tok = TOKENIZERS[name]()
    ex = Example("yes no", ("yes", "no"), 0, "f.jsonl:1")
    config = ScoringConfig(template="{input}\n" + ending, option_prefix=prefix)
    for (ids, n), option in zip(rows(tok, config, ex), ex.options):
        text = "yes no\n" + ending + prefix + option
        special, plain = whole(tok, text)
        assert ids == special + plain, (text, tok.convert_ids_to_tokens(ids), tok.convert_ids_to_tokens(special + plain))
        if tok.unk_token_id in ids:  # a tab outside the SentencePiece-style vocabulary
            continue
        # the scored tokens are the option (with the blanks before it), the rest the prompt
        assert text_of(tok, ids[-n:]).strip() == option
        assert text_of(tok, ids[len(special) : -n]).lstrip(" ") == ("yes no\n" + ending).rstrip(" \t")


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("sep", ["\n", " ", "\t", "\n\n", " \n"])
def test_channel_rows_are_the_text_as_written(name, sep):
    tok = TOKENIZERS[name]()
    ex = Example("the answer is yes", ("yes", "no"), 0, "f.jsonl:1")
    config = ScoringConfig(channel=True, channel_template="Label: {option}" + sep + "{input}")
    for (ids, n), option in zip(rows(tok, config, ex), ex.options):
        text = "Label: " + option + sep + "the answer is yes"
        special, plain = whole(tok, text)
        assert ids == special + plain, (text, tok.convert_ids_to_tokens(ids), tok.convert_ids_to_tokens(special + plain))
        if tok.unk_token_id in ids:
            continue
        assert text_of(tok, ids[-n:]).strip() == "the answer is yes"
        assert text_of(tok, ids[len(special) : -n]).lstrip(" ") == ("Label: " + option + sep).rstrip(" \t")


def test_a_template_typed_in_the_shell_means_its_newline(tmp_path):
    """`--template "{input}\\nAnswer:"` in double quotes reaches abmll with a backslash and an
    'n': read as the newline the user means, for every text flag, from the command line as
    from Python; a config read again stays the same."""
    from abmll.args import parse_args

    typed = ["--template", "{input}\\nAnswer:", "--option_prefix", "\\t", "--channel_template", "{option}\\n{input}"]
    _, cfg, _ = parse_args([*typed, "--out", str(tmp_path)], ["scoring"], command="adapt")
    scoring = cfg.scoring
    assert (scoring.template, scoring.option_prefix, scoring.channel_template) == ("{input}\nAnswer:", "\t", "{option}\n{input}")
    assert ScoringConfig(**vars(scoring)) == scoring  # read again: unchanged
    assert ScoringConfig(template="{input} C:\\data").template == "{input} C:\\data"  # other backslashes are kept
