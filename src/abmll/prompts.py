"""Prompts: how an example becomes token ids to score (:class:`ScoringConfig`).

Direct scoring: the prompt is ``template`` with ``{input}`` filled (optionally wrapped in the
tokenizer's chat template), each option scored after it behind ``option_prefix``. Channel
scoring (``channel=True``, MetaICL's noisy channel): the text of ``channel_template`` from
``{input}`` on is scored after the option. ``demonstrations``: support examples written the
same way before the prompt.

Text is scored as written: a scored continuation's tokens are those of the whole text after
the context's (lm-evaluation-harness's ``_encode_pair`` rule), the context's trailing spaces and
tabs moved into the continuation, so a word split across the boundary (``"Answer: " + "yes"``)
tokenises as it does in the whole text. A long input is cut from the left to fit
``max_length``: the input text is cut, never the template's text, the demonstrations kept (they
are dropped first) or the tokenizer's special tokens (a BOS stays first, and appears once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from abmll.checks import at_least, one_of
from abmll.data import Example
from abmll.roles import setting


@dataclass
class ScoringConfig:
    """How prompts are built and scored.

    Attributes:
        template: prompt built from an example, ``{input}`` replaced by its input text. In
            this and the other text settings, a typed ``\\n`` or ``\\t`` (as a shell passes
            ``"\\n"`` on) is read as a newline or tab.
        option_prefix: text put before each option (a space, so options tokenise as words).
        max_length: tokens per (prompt + longest option); a longer input is cut from the left
            (the template text and special tokens are kept).
        length_normalize: divide each option's summed log-probability by its token count.
        max_rows: at most this many (example, option) pairs per forward pass.
        pack_options: run each example's prompt once, its options packed after it, each
            option attending to the prompt and to itself only (a 4D attention mask, position
            ids restarting after the prompt). Same scores as one sequence per option, fewer
            tokens. False: one sequence per (example, option), for models without 4D masks.
        chat_template: wrap the templated input in the tokenizer's chat template as the user
            turn, with the generation prompt, so each option is scored as the assistant's
            answer (for instruct models). The special tokens come from the chat template
            (the tokenizer adds none of its own, so BOS appears once).
        channel: noisy-channel scoring (MetaICL): score each option c by log p(input | c), the
            text of ``channel_template`` from ``{input}`` on scored after the text before it
            (``{option}`` filled); class probabilities are the softmax over options as in direct
            scoring. ``template`` and ``option_prefix`` are not used; no chat template.
        channel_template: channel mode's text, with ``{option}`` before ``{input}``; the
            part from ``{input}`` on is scored.
        channel_loss: channel mode's training loss (inner loop, outer loop, adaptation):
            ``generative`` = -log p(input | true option), MetaICL's channel loss (summed over
            the input's tokens, or their mean with ``length_normalize``); ``softmax`` = the
            NLL of the softmax over options, as in direct mode. Predictions and reported NLL
            always use the softmax.
        demonstrations: m, in-context examples of the task's support set put before each
            prompt (each written as a scored example would be, with its true option; a blank
            line after each), in every scoring (adaptation, meta-training, prediction). Never
            the example being scored (nor one with the same input); fewer than m when m would
            not fit ``max_length`` without cutting the input. Needs the support set: given by
            evaluate and meta-train, the support file in adapt, ``--support`` in predict.
    """

    template: str = "{input}\nAnswer:"
    option_prefix: str = " "
    max_length: int = 256
    length_normalize: bool = False
    max_rows: int = 16
    pack_options: bool = True
    chat_template: bool = False
    channel: bool = setting(False, added=True)
    channel_template: str = setting("{option}\n{input}", added=True)
    channel_loss: Literal["generative", "softmax"] = setting("generative", added=True)
    demonstrations: int = setting(0, added=True)

    def __post_init__(self) -> None:
        for name in TEXT_FIELDS:
            setattr(self, name, read_escapes(getattr(self, name)))
        _fill_template(self.template)
        _split_channel_template(self.channel_template)
        at_least(self, ("max_length", "max_rows"), 1)
        at_least(self, ("demonstrations",), 0)
        one_of(self, "channel_loss", ("generative", "softmax"))
        if self.channel and self.chat_template:
            raise ValueError("--channel and --chat_template: channel scoring scores the input, not an assistant's answer")


TEXT_FIELDS = ("template", "option_prefix", "channel_template")
"""The text settings whose typed escapes :func:`read_escapes` reads."""


def read_escapes(text: str) -> str:
    """``text`` with a typed backslash-n and backslash-t read as a newline and a tab (a shell
    passes ``"\\n"`` on unchanged); other backslashes kept. Idempotent: a config read again
    (saved, replaced) stays the same."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _fill_template(template: str) -> str:
    """``template`` with its ``{input}`` field filled by a marker.

    Raises:
        ValueError: naming --template, when it has no ``{input}`` field or another field
            (e.g. ``{inputs}``; literal braces are written ``{{`` and ``}}``).
    """
    try:
        text = template.format(input=_SLOT)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"--template {template!r}: only the field {{input}} is allowed; write a literal brace as {{{{ or }}}} ({err!r})"
        ) from None
    if _SLOT not in text:
        raise ValueError(f"--template {template!r} has no {{input}} field: every prompt would ignore its input")
    return text


_OPTION = "\ue001"
"""A private-use character standing for the option in the channel template."""


def _split_channel_template(template: str) -> tuple[str, str]:
    """``(before, after)``: ``template``'s text before ``{input}`` (with ``{option}`` as
    :data:`_OPTION`) and after it.

    Raises:
        ValueError: naming --channel_template, when it lacks ``{option}`` or ``{input}``,
            has ``{option}`` after ``{input}`` or more than once, or another field.
    """
    try:
        text = template.format(input=_SLOT, option=_OPTION)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"--channel_template {template!r}: only the fields {{option}} and {{input}} are allowed; "
            f"write a literal brace as {{{{ or }}}} ({err!r})"
        ) from None
    before, slot, after = text.partition(_SLOT)
    if not slot or before.count(_OPTION) != 1 or _OPTION in after or _SLOT in after:
        raise ValueError(
            f"--channel_template {template!r}: needs {{option}} once, then {{input}} once (the input is scored after the option)"
        )
    return before, after


def _move_blank(context: str, continuation: str) -> tuple[str, str]:
    """``context``'s trailing spaces and tabs moved to the front of ``continuation`` (newlines
    stay: every tokenizer ends a token at one)."""
    kept = context.rstrip(" \t")
    return kept, context[len(kept) :] + continuation


def continuation_ids(tokenizer, context: str, continuations: Sequence[str]) -> list[list[int]]:
    """Token ids of each of ``continuations`` as it tokenises after ``context``: those of
    ``context + continuation`` past the tokens of ``context`` (lm-evaluation-harness's rule;
    ``context``'s trailing blanks moved into the continuation first, see :func:`_move_blank`;
    the context is encoded once). No special tokens."""
    context, moved = _move_blank(context, "")
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
    n = len(encode(context))
    return [encode(context + moved + c)[n:] for c in continuations]


_SLOT = "\ue000"
"""A private-use character standing for the input while the prompt's fixed text is found."""


@dataclass(frozen=True)
class PromptParts:
    """How a prompt is tokenised: its text is ``head + input + tail``, encoded without special
    tokens, after ``prefix``: the special tokens a tokenizer puts *before* a text (e.g.
    ``[bos]``; empty under a chat template, whose text holds them). Tokens a tokenizer appends
    after a text (an EOS) are left out: they would sit between the prompt and the answer."""

    head: str
    tail: str
    prefix: tuple[int, ...]


def prompt_parts(tokenizer, config: ScoringConfig, before: str = "") -> PromptParts:
    """Split the prompt (``before`` + ``config.template``, then the chat template when asked)
    around the input.

    Raises:
        ValueError: the template has no ``{input}`` field or another field (e.g. ``{inputs}``),
            ``chat_template`` is asked of a tokenizer that has none, or the tokenizer's special
            tokens cannot be told apart from a text's own tokens.
    """
    text = before + _fill_template(config.template)
    if config.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    head, _, tail = text.partition(_SLOT)
    prefix: tuple[int, ...] = ()
    if not config.chat_template:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
        if at is None:
            raise ValueError(
                f"cannot tell the tokenizer's special tokens from text: 'a' encodes to {plain} "
                f"without them and to {full} with them"
            )
        prefix = tuple(full[:at])
    return PromptParts(head, tail, prefix)


def _single_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` with a doubled leading BOS (the tokenizer's and one in the text) made single."""
    while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def tokenize_prompt(tokenizer, parts: PromptParts, text: str, room: int) -> tuple[list[int], int]:
    """Token ids of the prompt for input ``text``, at most ``room`` of them. When too long, the
    *input* is cut from the left at a token boundary (its end, nearest the answer, is kept) and
    the whole prompt is encoded again, so a cut prompt is tokenised as an uncut one would be;
    the template's text and the special-token prefix are never cut (a BOS stays first).

    Returns:
        (ids, cut): ``cut`` = number of the input's own tokens dropped (0 when it fits).
    Raises:
        ValueError: the template and special tokens alone leave no room for the input.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    encode = lambda t: _single_bos([*parts.prefix, *tokenizer(t, add_special_tokens=False)["input_ids"]], bos)  # noqa: E731
    ids = encode(parts.head + text + parts.tail)
    if len(ids) <= room:
        return ids, 0
    no_room = ValueError(f"the template's text and special tokens leave no room for the input in {room} tokens; raise max_length")
    body = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(tokenizer.is_fast))
    starts = [a for a, _ in body["offset_mapping"]] if tokenizer.is_fast else None
    drop = len(ids) - room
    while starts is not None:  # fast tokenizers: cut the text where a token (and a character) starts
        if drop >= len(starts):
            raise no_room
        if drop and starts[drop] == starts[drop - 1]:  # inside a character: go to the next one
            drop += 1
            continue
        ids = encode(parts.head + text[starts[drop] :] + parts.tail)
        if len(ids) <= room:
            return ids, drop
        drop += 1
    head, tail = (
        tokenizer(parts.head, add_special_tokens=False)["input_ids"] if parts.head else [],
        tokenizer(parts.tail, add_special_tokens=False)["input_ids"] if parts.tail else [],
    )
    keep = room - len(parts.prefix) - len(head) - len(tail)  # slow tokenizers: cut the token list
    if keep < 1:
        raise no_room
    return _single_bos([*parts.prefix, *head, *body["input_ids"][-keep:], *tail], bos), len(body["input_ids"]) - keep


DEMONSTRATION_END = "\n\n"
"""What follows each in-context demonstration."""


def demonstration_text(ex: Example, config: ScoringConfig) -> str:
    """Example ``ex`` written as scoring reads it, with its true option: the template's text and
    ``option_prefix`` + option (direct), or ``channel_template`` (channel); then
    :data:`DEMONSTRATION_END`. No special tokens and no chat template."""
    answer = ex.options[ex.label]
    if config.channel:
        before, after = _split_channel_template(config.channel_template)
        text = before.replace(_OPTION, answer) + ex.input + after
    else:
        text = _fill_template(config.template).replace(_SLOT, ex.input) + config.option_prefix + answer
    return text + DEMONSTRATION_END


def pick_demonstrations(ex: Example, pool: Sequence[Example], m: int) -> list[Example]:
    """The first ``m`` examples of ``pool`` (in its order) whose input is not ``ex``'s."""
    return [d for d in pool if d.input != ex.input][:m]


def tokenize_examples(tokenizer, examples: Sequence[Example], config: ScoringConfig, pool: Sequence[Example] | None = None):
    """Per example: (prompt ids, per option (unscored ids, scored ids), input tokens dropped,
    the input's token count when it was cut (else 0), demonstrations used). The input is cut
    from the left when needed (direct: the prompt's; channel: the scored tokens'); with
    ``config.demonstrations``, as many of them as fit without cutting it (none when it is cut).

    Raises:
        ValueError: ``config.demonstrations`` > 0 without a ``pool`` (the support set).
    """
    if config.demonstrations and pool is None:
        raise ValueError("--demonstrations needs the task's support set (predict: --support FILE)")
    tokenize = _tokenize_channel if config.channel else _tokenize_direct
    plain = prompt_parts(tokenizer, config)
    if config.channel:  # no template text around the input; the head holds the demonstrations
        plain = PromptParts("", "", plain.prefix)
    out = []
    for ex in examples:
        try:
            demos = pick_demonstrations(ex, pool, config.demonstrations) if config.demonstrations else []
            for m in range(len(demos), -1, -1):  # the most demonstrations that leave the input whole
                text = "".join(demonstration_text(d, config) for d in demos[:m])
                parts = plain if not m else _with_demonstrations(tokenizer, config, plain, text)
                try:
                    result = tokenize(tokenizer, parts, ex, config)
                except ValueError:
                    if not m:
                        raise
                    continue  # m demonstrations leave no room: fewer
                if not result[2]:
                    break
            out.append((*result, m))
        except ValueError as err:
            raise ValueError(f"{ex.source or repr(ex.input[:40])}: {err}") from None
    return out


def _with_demonstrations(tokenizer, config: ScoringConfig, plain: PromptParts, text: str) -> PromptParts:
    """``plain`` with ``text`` (the demonstrations, as written) before the template's text;
    inside the user turn under a chat template."""
    if config.chat_template:
        return prompt_parts(tokenizer, config, before=text)
    return PromptParts(text + plain.head, plain.tail, plain.prefix)


def _tokenize_direct(tokenizer, parts: PromptParts, ex: Example, config: ScoringConfig):
    tail, moved = _move_blank(parts.tail, "")
    text = ex.input
    if not tail:  # the input ends the prompt: its own trailing blanks move with the template's
        text, moved = _move_blank(text, moved)
    context = parts.head + text + tail
    options = continuation_ids(tokenizer, context, [moved + config.option_prefix + o for o in ex.options])
    if not options or min(len(o) for o in options) == 0:
        raise ValueError("no options, or an option tokenises to nothing")
    longest = max(len(o) for o in options)
    room = config.max_length - longest
    if room < 1:
        raise ValueError(f"an option of {longest} tokens does not fit max_length={config.max_length}; raise max_length")
    prompt, cut = tokenize_prompt(tokenizer, PromptParts(parts.head, tail, parts.prefix), text, room)
    if not prompt:
        raise ValueError("the prompt tokenises to nothing (empty input?)")
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if cut else 0
    return prompt, [([], o) for o in options], cut, total


def _tokenize_channel(tokenizer, parts: PromptParts, ex: Example, config: ScoringConfig):
    # the shared prompt: special tokens, then the demonstrations (``parts.head``; no template text)
    demos = tokenizer(parts.head, add_special_tokens=False)["input_ids"] if parts.head else []
    prefix = [*parts.prefix, *demos]
    before, after = _split_channel_template(config.channel_template)
    if not ex.options:
        raise ValueError("no options")
    segments = []
    for option in ex.options:
        cond, scored = _move_blank(before.replace(_OPTION, option), ex.input + after)
        cond_ids = tokenizer(cond, add_special_tokens=False)["input_ids"] if cond else []
        if not cond_ids:
            raise ValueError(f"option {option!r} under --channel_template tokenises to nothing")
        segments.append((cond_ids, *continuation_ids(tokenizer, cond, [scored])))
    if min(len(t) for _, t in segments) == 0:
        raise ValueError("the input tokenises to nothing (empty input?)")
    room = config.max_length - len(prefix) - max(len(c) for c, _ in segments)
    if room < 1:
        raise ValueError(f"an option does not leave room for the input in max_length={config.max_length}; raise max_length")
    total = max(len(t) for _, t in segments)
    cut = max(0, total - room)
    return prefix, [(c, t[-room:]) for c, t in segments], cut, total if cut else 0
