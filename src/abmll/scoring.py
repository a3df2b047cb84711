"""Option scoring: log p(option | prompt) for a batch of multiple-choice examples.

Method doc, "Likelihood for tasks with options": score_c = sum of the token log-probabilities
of option c given the prompt built from the input; p(y | x, dW) = softmax_c(score_c).

Every (example, option) pair is one row: the prompt's tokens followed by the option's tokens,
LEFT-padded so that all options end at the last position. The model then only needs logits
for the last ``max_option_len + 1`` positions (``logits_to_keep``), not for the whole
sequence: the (rows, seq, vocab) logits tensor is never built. A long prompt is truncated
from the left so that the prompt plus the example's longest option fit in ``max_length``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from abmll.data import Example

LogitsFn = Callable[..., Tensor]
"""(input_ids, attention_mask, position_ids, logits_to_keep, groups) -> logits (R, keep, V)."""


@dataclass
class ScoringConfig:
    """How prompts are built and scored.

    Attributes:
        template: prompt built from an example, ``{input}`` replaced by its input text.
        option_prefix: text put before each option (a space, so options tokenise as words).
        max_length: tokens per (prompt + option) row; the prompt is cut from the left.
        length_normalize: divide each option's summed log-probability by its token count.
        max_rows: at most this many (example, option) rows per forward pass.
    """

    template: str = "{input}\nAnswer:"
    option_prefix: str = " "
    max_length: int = 256
    length_normalize: bool = False
    max_rows: int = 16


@dataclass
class OptionBatch:
    """Tokenised rows for N examples with up to C options each (R = total options).

    Attributes:
        input_ids, attention_mask, position_ids: (R, T) long, left-padded.
        option_ids, option_mask: (R, L) the option tokens right-aligned (L = longest option).
        row_example, row_option: (R,) long, which example / option index each row is.
        labels: (N,) long answer indices.
        num_options: (N,) long.
        example_index: (N,) long, each example's position in the list it was built from.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    option_ids: Tensor
    option_mask: Tensor
    row_example: Tensor
    row_option: Tensor
    labels: Tensor
    num_options: Tensor
    example_index: Tensor

    @property
    def num_examples(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "OptionBatch":
        return OptionBatch(**{k: v.to(device) for k, v in vars(self).items()})


def _tokenize(tokenizer, examples: Sequence[Example], config: ScoringConfig):
    """Per example: (prompt ids truncated from the left, list of option ids)."""
    out = []
    for ex in examples:
        prompt = tokenizer(config.template.format(input=ex.input), add_special_tokens=True)["input_ids"]
        options = [tokenizer(config.option_prefix + o, add_special_tokens=False)["input_ids"] for o in ex.options]
        if not options or min(len(o) for o in options) == 0:
            raise ValueError(f"{ex.source or ex.input[:40]!r}: no options, or an option tokenises to nothing")
        longest = max(len(o) for o in options)
        room = config.max_length - longest
        if room < 1:
            raise ValueError(
                f"{ex.source or ex.input[:40]!r}: an option of {longest} tokens does not fit "
                f"max_length={config.max_length}; raise max_length")
        out.append((prompt[-room:], options))
    return out


def encode_options(tokenizer, examples: Sequence[Example], config: ScoringConfig,
                   example_index: Sequence[int] | None = None) -> OptionBatch:
    """Tokenise ``examples`` into one :class:`OptionBatch` (all their options in one batch).

    Raises:
        ValueError: empty ``examples``, an option that tokenises to nothing, or an option
            longer than ``config.max_length``; the message names the example's source line.
    """
    if not examples:
        raise ValueError("encode_options needs at least one example")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized = _tokenize(tokenizer, examples, config)
    rows = [(i, c, prompt + opt, opt) for i, (prompt, opts) in enumerate(tokenized) for c, opt in enumerate(opts)]
    T = max(len(seq) for _, _, seq, _ in rows)
    L = max(len(opt) for _, _, _, opt in rows)
    R = len(rows)
    input_ids = torch.full((R, T), pad, dtype=torch.long)
    attention_mask = torch.zeros(R, T, dtype=torch.long)
    option_ids = torch.full((R, L), pad, dtype=torch.long)
    option_mask = torch.zeros(R, L, dtype=torch.bool)
    for r, (_, _, seq, opt) in enumerate(rows):
        input_ids[r, T - len(seq):] = torch.tensor(seq)
        attention_mask[r, T - len(seq):] = 1
        option_ids[r, L - len(opt):] = torch.tensor(opt)
        option_mask[r, L - len(opt):] = True
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return OptionBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        option_ids=option_ids, option_mask=option_mask,
        row_example=torch.tensor([r[0] for r in rows]), row_option=torch.tensor([r[1] for r in rows]),
        labels=torch.tensor([ex.label for ex in examples]),
        num_options=torch.tensor([len(ex.options) for ex in examples]),
        example_index=torch.tensor(list(example_index) if example_index is not None else range(len(examples))),
    )


def make_batches(tokenizer, examples: Sequence[Example], config: ScoringConfig) -> list[OptionBatch]:
    """Split ``examples`` into :class:`OptionBatch` es of at most ``config.max_rows`` rows
    (an example with more options than that gets a batch of its own), grouping examples of
    similar length to cut padding. ``example_index`` maps results back to input order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input))
    batches, chunk, rows = [], [], 0
    for i in order:
        n = len(examples[i].options)
        if chunk and rows + n > config.max_rows:
            batches.append(chunk)
            chunk, rows = [], 0
        chunk.append(i)
        rows += n
    if chunk:
        batches.append(chunk)
    return [encode_options(tokenizer, [examples[i] for i in idx], config, idx) for idx in batches]


def option_scores(logits_fn: LogitsFn, batch: OptionBatch, length_normalize: bool = False) -> Tensor:
    """Summed (or mean, with ``length_normalize``) option-token log-probabilities.

    Args:
        logits_fn: runs the LM; called with input_ids, attention_mask, position_ids,
            logits_to_keep and groups (= ``row_example``: all options of an example share one
            weight sample) and returns logits (R, logits_to_keep, V).
        batch: from :func:`encode_options`.
    Returns:
        (N, C_max) float scores; entries past an example's number of options are -inf.
    """
    L = batch.option_ids.shape[1]
    logits = logits_fn(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask,
        position_ids=batch.position_ids, logits_to_keep=L + 1, groups=batch.row_example,
    )[:, :-1]
    token_lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.option_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.option_mask
    row_scores = (token_lp * mask).sum(-1)
    if length_normalize:
        row_scores = row_scores / mask.sum(-1)
    scores = torch.full((batch.num_examples, int(batch.num_options.max())), float("-inf"), device=row_scores.device)
    return scores.index_put((batch.row_example, batch.row_option), row_scores)


def option_nll(scores: Tensor, labels: Tensor) -> Tensor:
    """-log softmax(scores)[label] per example. scores: (N, C) with -inf padding; labels (N,).
    Returns (N,) nats."""
    return -torch.log_softmax(scores, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
