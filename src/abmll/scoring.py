"""Option scoring: log p(option | prompt) for a batch of multiple-choice examples.

Method doc, "Likelihood for tasks with options": score_c = sum of the token log-probabilities
of option c given the prompt built from the input; p(y | x, dW) = softmax_c(score_c).
``channel=True`` is MetaICL's noisy channel: score_c = log p(input | option c). How an
example becomes token ids is :mod:`abmll.prompts`; this module lays them out and scores them.

By default each example is one LEFT-padded sequence: its prompt once, then all its options,
each option attending to the prompt and to itself only (4D attention mask, position ids
restarting after the prompt), so the prompt is not recomputed per option. The model only
needs logits for the positions whose next token is scored (``logits_to_keep``); the (rows,
seq, vocab) logits tensor is never built. ``pack_options=False`` gives one sequence per
(example, option), the reference layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from abmll.data import Example
from abmll.prompts import ScoringConfig, tokenize_examples

LogitsFn = Callable[..., Tensor]
"""(input_ids, attention_mask, position_ids, logits_to_keep, groups) -> logits (R, keep, V)."""


@dataclass
class OptionBatch:
    """Tokenised sequences for N examples with up to C options each; R = total options.

    S sequences of T tokens: one per (example, option) (unpacked) or one per example with
    its options packed after the prompt. Each option's segment is an unscored part (empty in
    direct scoring; the option text in channel scoring, whose shared prompt is only the
    tokenizer's special tokens) then its scored tokens ("option tokens" below: the option in
    direct scoring, the input in channel scoring). Option token j of option row r sits at index
    ``pred_index[r, j] + 1`` of the last ``keep`` positions of sequence ``option_seq[r]``;
    its log-probability is read from the logits at ``pred_index[r, j]``.

    Attributes:
        input_ids, position_ids: (S, T) long, left-padded.
        attention_mask: (S, T) long, or (S, 1, T, T) float additive (0 / -inf) when packed.
        keep: how many final positions need logits (``logits_to_keep``).
        groups: (S,) long, the example of each sequence (one weight sample per example).
        option_seq: (R,) long; pred_index, option_ids: (R, L) long; option_mask: (R, L) bool.
        row_example, row_option: (R,) long, which example / option index each row is.
        labels: (N,) long answer indices. num_options: (N,) long.
        example_index: (N,) long, each example's position in the list it was built from.
        length_normalize: score options by mean rather than summed token log-probability
            (``ScoringConfig.length_normalize``, carried so every scorer of the batch uses it).
        loss: the training loss of the batch (:func:`training_loss`): ``softmax`` or
            ``generative`` (channel scoring's -score of the true option).
        dropped_tokens: (N,) long, how many of each input's own tokens were cut from its left
            to fit ``max_length`` (0: not truncated).
        dropped_fraction: (N,) float, that count over the input's token count.
        demonstrations: (N,) long, how many in-context demonstrations each prompt holds.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    keep: int
    groups: Tensor
    option_seq: Tensor
    pred_index: Tensor
    option_ids: Tensor
    option_mask: Tensor
    row_example: Tensor
    row_option: Tensor
    labels: Tensor
    num_options: Tensor
    example_index: Tensor
    length_normalize: bool = False
    loss: str = "softmax"
    dropped_tokens: Tensor | None = None
    dropped_fraction: Tensor | None = None
    demonstrations: Tensor | None = None

    @property
    def num_examples(self) -> int:
        """N, the number of examples (not rows or sequences) in the batch."""
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "OptionBatch":
        """A copy with every tensor on ``device``."""
        return OptionBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()})


def encode_options(
    tokenizer,
    examples: Sequence[Example],
    config: ScoringConfig,
    example_index: Sequence[int] | None = None,
    demonstrations: Sequence[Example] | None = None,
) -> OptionBatch:
    """Tokenise ``examples`` into one :class:`OptionBatch` (all their options in one batch).
    ``demonstrations``: the pool ``config.demonstrations`` draws from (the task's support set).

    Raises:
        ValueError: empty ``examples``, an option that tokenises to nothing, an option
            longer than ``config.max_length`` (the message names the example's source line),
            or ``config.demonstrations`` without ``demonstrations``.
    """
    if not examples:
        raise ValueError("encode_options needs at least one example")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenized = tokenize_examples(tokenizer, examples, config, demonstrations)
    dropped = torch.tensor([cut for *_, cut, _, _ in tokenized], dtype=torch.long)
    fraction = torch.tensor([cut / total if cut else 0.0 for *_, cut, total, _ in tokenized])
    used = torch.tensor([m for *_, m in tokenized], dtype=torch.long)
    tokenized = [(prompt, opts) for prompt, opts, *_ in tokenized]
    # segments per sequence: [(prompt ids, [(row, (unscored ids, scored ids)), ...]), ...]
    rows = [(i, c) for i, (_, opts) in enumerate(tokenized) for c in range(len(opts))]
    if config.pack_options:
        seqs = [
            (prompt, [(r, opts[c]) for r, (i2, c) in enumerate(rows) if i2 == i]) for i, (prompt, opts) in enumerate(tokenized)
        ]
    else:
        seqs = [(tokenized[i][0], [(r, tokenized[i][1][c])]) for r, (i, c) in enumerate(rows)]
    size = lambda opts: sum(len(u) + len(o) for _, (u, o) in opts)  # noqa: E731
    S, R = len(seqs), len(rows)
    T = max(len(p) + size(opts) for p, opts in seqs)
    L = max(len(o) for _, opts in seqs for _, (_, o) in opts)
    input_ids = torch.full((S, T), pad, dtype=torch.long)
    position_ids = torch.zeros(S, T, dtype=torch.long)
    segment = torch.full((S, T), -1, dtype=torch.long)  # -1 pad, 0 prompt, c + 1 option c
    option_seq = torch.zeros(R, dtype=torch.long)
    pred_index = torch.zeros(R, L, dtype=torch.long)
    option_ids = torch.full((R, L), pad, dtype=torch.long)
    option_mask = torch.zeros(R, L, dtype=torch.bool)
    for s, (prompt, opts) in enumerate(seqs):
        start = T - len(prompt) - size(opts)
        pos = start + len(prompt)  # first option token
        input_ids[s, start:pos] = torch.tensor(prompt, dtype=torch.long)
        position_ids[s, start:pos] = torch.arange(len(prompt))
        segment[s, start:pos] = 0
        for seg, (r, (unscored, opt)) in enumerate(opts, start=1):
            ids, n = [*unscored, *opt], len(opt)
            input_ids[s, pos : pos + len(ids)] = torch.tensor(ids)
            position_ids[s, pos : pos + len(ids)] = torch.arange(len(prompt), len(prompt) + len(ids))
            segment[s, pos : pos + len(ids)] = seg
            # scored token j is predicted at the position before it: the first at the end of
            # the unscored part, or of the prompt when there is none
            first = pos + len(unscored)
            prev = torch.arange(first - 1, first + n - 1)
            if not unscored:  # packed options follow each other: the first is read off the prompt's end
                prev[0] = start + len(prompt) - 1
            option_seq[r] = s
            pred_index[r, L - n :] = prev
            option_ids[r, L - n :] = torch.tensor(opt)
            option_mask[r, L - n :] = True
            pos += len(ids)
    keep = T - int(pred_index[option_mask].min())  # from the first position whose logits are read
    pred_index = (pred_index - (T - keep)) * option_mask
    if config.pack_options:
        q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # (S, T, 1), (S, 1, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
        allowed |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves
        attention_mask = torch.zeros(S, 1, T, T).masked_fill(~allowed.unsqueeze(1), float("-inf"))
    else:
        attention_mask = (segment >= 0).long()
    return OptionBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        keep=keep,
        groups=torch.tensor([rows[opts[0][0]][0] for _, opts in seqs]),
        option_seq=option_seq,
        pred_index=pred_index,
        option_ids=option_ids,
        option_mask=option_mask,
        row_example=torch.tensor([i for i, _ in rows]),
        row_option=torch.tensor([c for _, c in rows]),
        labels=torch.tensor([ex.label for ex in examples]),
        num_options=torch.tensor([len(ex.options) for ex in examples]),
        example_index=torch.tensor(list(example_index) if example_index is not None else range(len(examples))),
        length_normalize=config.length_normalize,
        loss=config.channel_loss if config.channel else "softmax",
        dropped_tokens=dropped,
        dropped_fraction=fraction,
        demonstrations=used,
    )


def make_batches(
    tokenizer, examples: Sequence[Example], config: ScoringConfig, demonstrations: Sequence[Example] | None = None
) -> list[OptionBatch]:
    """Split ``examples`` into :class:`OptionBatch` es of at most ``config.max_rows``
    (example, option) pairs (an example with more options gets a batch of its own), grouping
    examples of similar length to cut padding. ``example_index`` maps results back to input order.
    ``demonstrations``: the task's support set, drawn from when ``config.demonstrations`` > 0.

    Raises:
        ValueError: an example whose prompt tokenises to nothing, that has no options or an
            empty one, or whose options do not fit in ``max_length`` (the message names the
            example's source file and line when known), or ``config.demonstrations`` without
            ``demonstrations``.
    """
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
    return [encode_options(tokenizer, [examples[i] for i in idx], config, idx, demonstrations) for idx in batches]


def option_scores(logits_fn: LogitsFn, batch: OptionBatch) -> Tensor:
    """Summed (or mean, when ``batch.length_normalize``) option-token log-probabilities.

    Args:
        logits_fn: runs the LM; called with input_ids, attention_mask, position_ids,
            logits_to_keep and groups (all sequences of an example share one weight sample)
            and returns logits (S, logits_to_keep, V).
        batch: from :func:`encode_options`.
    Returns:
        (N, C_max) float scores; entries past an example's number of options are -inf.
    """
    logits = logits_fn(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep,
        groups=batch.groups,
    )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    seq = batch.option_seq.unsqueeze(-1)
    token_lp = logits[seq, batch.pred_index, batch.option_ids] - torch.logsumexp(logits, -1)[seq, batch.pred_index]
    mask = batch.option_mask
    row_scores = (token_lp * mask).sum(-1)
    if batch.length_normalize:
        row_scores = row_scores / mask.sum(-1)
    scores = torch.full(
        (batch.num_examples, int(batch.num_options.max())), float("-inf"), dtype=row_scores.dtype, device=row_scores.device
    )
    return scores.index_put((batch.row_example, batch.row_option), row_scores)


def option_nll(scores: Tensor, labels: Tensor) -> Tensor:
    """-log softmax(scores)[label] per example. scores: (N, C) with -inf padding; labels (N,).
    Returns (N,) nats."""
    return -torch.log_softmax(scores, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def training_loss(scores: Tensor, batch: OptionBatch) -> Tensor:
    """The per-example loss every training loop minimises (inner, outer, adaptation), as
    ``batch.loss`` says: ``softmax``, :func:`option_nll`; ``generative`` (channel scoring),
    -scores[label] = -log p(input | true option), MetaICL's channel loss, summed over the
    input's tokens (their mean with ``length_normalize``). scores: (N, C). Returns (N,) nats."""
    if batch.loss == "generative":
        return -scores.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    return option_nll(scores, batch.labels)


def truncation_summary(batches: Sequence[OptionBatch]) -> dict:
    """How many examples of ``batches`` had their input cut to fit ``max_length``:
    ``{"examples", "truncated", "mean_dropped_fraction" (over the truncated ones),
    "max_dropped_fraction", "dropped_tokens" (total)}``."""
    frac = torch.cat([b.dropped_fraction for b in batches if b.dropped_fraction is not None]) if batches else None
    tokens = torch.cat([b.dropped_tokens for b in batches if b.dropped_tokens is not None]) if batches else None
    if frac is None or frac.numel() == 0:
        return {"examples": 0, "truncated": 0, "mean_dropped_fraction": 0.0, "max_dropped_fraction": 0.0, "dropped_tokens": 0}
    cut = frac > 0
    return {
        "examples": int(frac.numel()),
        "truncated": int(cut.sum()),
        "mean_dropped_fraction": float(frac[cut].mean()) if cut.any() else 0.0,
        "max_dropped_fraction": float(frac.max()),
        "dropped_tokens": int(tokens.sum()),
    }


def merge_truncation(summaries: Sequence[dict]) -> dict:
    """Several :func:`truncation_summary` results as one (means weighted by truncated counts)."""
    truncated = sum(s["truncated"] for s in summaries)
    return {
        "examples": sum(s["examples"] for s in summaries),
        "truncated": truncated,
        "mean_dropped_fraction": sum(s["mean_dropped_fraction"] * s["truncated"] for s in summaries) / truncated
        if truncated
        else 0.0,
        "max_dropped_fraction": max((s["max_dropped_fraction"] for s in summaries), default=0.0),
        "dropped_tokens": sum(s["dropped_tokens"] for s in summaries),
    }
