"""Chat templates and loss masks: a conversation becomes token ids plus next-token labels.

Design. A template turns each message into a list of spans: plain text, one special token (looked
up by id, never encoded from text), or the tokenizer's EOS. Each span carries whether it is the
*output* of an assistant turn (the reply and what ends it). `render_chat` encodes every span on its
own and concatenates the ids, so the scored region is known by construction: a prefix is never
re-tokenised to find where the reply starts (that breaks whenever a tokenizer merges across the
boundary). The mask mode then decides which spans are scored:

    assistant  every assistant turn's output (default)
    all        every token (the template's own text too)
    last       only the last assistant turn's output

Labels convention (that of pre-training, llmkit/data/streaming.py `windows`, where targets[i] is
the token after inputs[i]): `Rendered.ids` and `Rendered.labels` have the same length and
`labels[i] = ids[i + 1]` when token i + 1 is scored, else -100 (ignored by `Transformer.loss`);
the last label is always -100. So `model.loss(ids, labels)` trains the reply: the last prompt
position is the first scored one, and the end of turn (chatml's <|im_end|>, alpaca's and raw's
EOS) is itself a target, so the model learns to stop. A tokenizer with a BOS gets exactly one, at
position 0, never a target.

User text never becomes a special token: a text span that would encode to a reserved id (a
template token, BOS, EOS or PAD; sentencepiece's user-defined pieces and HF added tokens match
inside any text) is encoded in halves until no piece does. It decodes back to the same text, but
a typed "<|im_start|>" is spelled out, never the delimiter.

Each span is encoded separately, so a sentencepiece model that adds a dummy-prefix space adds one
per span (llmkit's own tokenizers are trained without it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from llmkit.registry import Registry
from llmkit.text.tokenizer import CHAT_TOKENS, Tokenizer

IGNORE = -100  # Transformer.loss ignores this target
MASKS = ("assistant", "all", "last")
Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str, "input"?: str}


class Span(NamedTuple):
    kind: Literal["text", "token", "eos"]
    text: str = ""  # the text, or the special token's string
    output: bool = False  # part of an assistant turn's output: scored in modes assistant / last


def _text(message: Message) -> str:
    if not isinstance(message.get("content"), str):
        raise ValueError(f"a message needs a 'role' and a string 'content'; got {dict(message)!r}")
    return message["content"]


def _content(message: Message) -> str:
    """The message text; an alpaca-style "input" (context for the instruction) follows it after a
    blank line in templates without a slot of their own for it."""
    extra = message.get("input")
    return f"{_text(message)}\n\n{extra}" if extra else _text(message)


class ChatTemplate:
    """How messages become spans. `specials`: tokens that must be single vocabulary entries;
    `end_of_turn`: the text that ends an assistant turn, "" meaning the tokenizer's EOS."""

    specials: tuple[str, ...] = ()
    end_of_turn: str = ""
    roles = ("system", "user", "assistant")

    def message(self, message: Message) -> list[Span]:
        raise NotImplementedError

    def generation_prompt(self) -> list[Span]:
        """The opening of an assistant turn: what a model continues from when it generates."""
        raise NotImplementedError

    def spans(self, message: Message) -> list[Span]:
        if message.get("role") not in self.roles:
            raise ValueError(f"{type(self).__name__}: unknown role {message.get('role')!r}; expected one of {self.roles}")
        return self.message(message)


CHAT_TEMPLATES: Registry[ChatTemplate] = Registry("chat template")


@CHAT_TEMPLATES.register("chatml")
class ChatML(ChatTemplate):
    """<|im_start|>role\\n{content}<|im_end|>\\n. The reply and <|im_end|> are the output; the
    newline after <|im_end|> is scaffolding, so generation stops at <|im_end|>."""

    specials = CHAT_TOKENS
    end_of_turn = CHAT_TOKENS[1]

    def message(self, message: Message) -> list[Span]:
        out = message["role"] == "assistant"
        start, end = CHAT_TOKENS
        return [
            Span("token", start), Span("text", f"{message['role']}\n"),
            Span("text", _content(message), out), Span("token", end, out), Span("text", "\n"),
        ]

    def generation_prompt(self) -> list[Span]:
        return [Span("token", CHAT_TOKENS[0]), Span("text", "assistant\n")]


@CHAT_TEMPLATES.register("alpaca")
class Alpaca(ChatTemplate):
    """Plain text: a system message as a preamble, then "### Instruction:\\n{user}\\n\\n",
    "### Input:\\n{input}\\n\\n" when the user message has an "input", "### Response:\\n{reply}"
    + EOS. No special tokens beyond the tokenizer's EOS."""

    def message(self, message: Message) -> list[Span]:
        role = message["role"]
        if role == "system":
            return [Span("text", f"{_text(message)}\n\n")]
        if role == "user":
            extra = message.get("input")
            return [Span("text", f"### Instruction:\n{_text(message)}\n\n" + (f"### Input:\n{extra}\n\n" if extra else ""))]
        return [*self.generation_prompt(), Span("text", _text(message), True), Span("eos", output=True)]

    def generation_prompt(self) -> list[Span]:
        return [Span("text", "### Response:\n")]


@CHAT_TEMPLATES.register("raw")
class Raw(ChatTemplate):
    """The texts concatenated as they are; an assistant reply is followed by EOS (prompt/completion
    data: the prompt unscored, the completion and EOS scored)."""

    def message(self, message: Message) -> list[Span]:
        if message["role"] != "assistant":
            return [Span("text", _content(message))]
        return [Span("text", _text(message), True), Span("eos", output=True)]

    def generation_prompt(self) -> list[Span]:
        return []


# ---- the template's tokens -----------------------------------------------------------------------
def _template(name: str) -> ChatTemplate:
    return CHAT_TEMPLATES.build(name)


def end_of_turn(template: str) -> str:
    """The text that ends an assistant turn (chatml: "<|im_end|>"). "" for templates that end it
    with the tokenizer's EOS (alpaca, raw): use `end_of_turn_id` to stop generation there."""
    return _template(template).end_of_turn


def end_of_turn_id(tokenizer: Tokenizer, template: str) -> int | None:
    """The id that ends an assistant turn: the template's end-of-turn token, else the EOS."""
    text = end_of_turn(template)
    return tokenizer.token_to_id(text) if text else tokenizer.eos_id


def check_template(tokenizer: Tokenizer, template: str) -> None:
    """Raise ValueError, naming them, when the template's special tokens are not single tokens of
    the vocabulary, or when it ends turns with an EOS the tokenizer does not have."""
    tpl = _template(template)
    missing = [t for t in tpl.specials if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(
            f"chat template '{template}': template tokens missing from the vocabulary of this {tokenizer.kind} "
            f"tokenizer: {missing}. Either train the tokenizer with llmkit (sentencepiece reserves {list(CHAT_TOKENS)} "
            f"unless reserve_chat_tokens=false), or add them with llmkit.text.tokenizer.add_special_tokens(tokenizer, "
            f"{missing}) and resize the model's embeddings to the new vocab_size, or use template=alpaca or "
            "template=raw, which need no special tokens"
        )
    if not tpl.end_of_turn and tokenizer.eos_id is None:
        raise ValueError(
            f"chat template '{template}' ends assistant turns with the tokenizer's EOS and this {tokenizer.kind} "
            "tokenizer has none, so a model could not learn to stop: use a tokenizer with an EOS, or add one "
            "(llmkit.text.tokenizer.add_special_tokens(tokenizer, ['</s>']) for a char tokenizer)"
        )


# ---- rendering -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    """ids: the conversation's tokens; labels: same length, labels[i] = ids[i + 1] if that token
    is scored else -100 (the module docstring gives the convention)."""

    ids: list[int]
    labels: list[int]

    @property
    def n_scored(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class _Encoder:
    """Spans -> ids for one tokenizer and template: special tokens by id, text guarded."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.special_ids = {t: tokenizer.token_to_id(t) for t in template.specials}
        ids = (*self.special_ids.values(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        self.reserved = {i for i in ids if i is not None}

    def span(self, span: Span) -> list[int]:
        if span.kind == "token":
            return [self.special_ids[span.text]]  # type: ignore[list-item]  # check_template: not None
        if span.kind == "eos":
            return [self.tokenizer.eos_id]  # type: ignore[list-item]  # check_template: not None
        return self.text(span.text)

    def text(self, text: str) -> list[int]:
        """Encode text so that no reserved id comes out of it: halve until none does (rare: only
        text that spells a special token takes this path; one character is kept as it encodes)."""
        ids = self.tokenizer.encode(text) if text else []
        if len(text) < 2 or self.reserved.isdisjoint(ids):
            return ids
        half = len(text) // 2
        return self.text(text[:half]) + self.text(text[half:])


def _scored_spans(template: ChatTemplate, messages: Sequence[Message], mask: str) -> list[tuple[Span, bool]]:
    if mask not in MASKS:
        raise ValueError(f"unknown loss mask '{mask}'; valid: {', '.join(MASKS)}")
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    return [
        (span, mask == "all" or (span.output and (mask == "assistant" or i == last)))
        for i, message in enumerate(messages)
        for span in template.spans(message)
    ]


def _encode(encoder: _Encoder, spans: Iterable[tuple[Span, bool]]) -> tuple[list[int], list[bool]]:
    """(ids, scored per token), with one leading BOS (never scored) when the tokenizer has one."""
    bos = encoder.tokenizer.bos_id
    ids, scored = ([bos], [False]) if bos is not None else ([], [])
    for span, is_scored in spans:
        span_ids = encoder.span(span)
        ids += span_ids
        scored += [is_scored] * len(span_ids)
    return ids, scored


def render_chat(
    messages: Sequence[Message], tokenizer: Tokenizer, template: str = "chatml", mask: str = "assistant"
) -> Rendered:
    """Token ids and next-token labels for one conversation (see the module docstring).

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]; a user message may
    carry "input" (alpaca's context field). mask: assistant | all | last. A conversation with
    nothing scored renders with all labels -100: `truncate` drops and counts it."""
    check_template(tokenizer, template)
    tpl = _template(template)
    ids, scored = _encode(_Encoder(tokenizer, tpl), _scored_spans(tpl, messages, mask))
    labels = [t if s else IGNORE for t, s in zip(ids[1:], scored[1:], strict=True)] + [IGNORE]
    return Rendered(ids, labels)


def render_generation_prompt(messages: Sequence[Message], tokenizer: Tokenizer, template: str = "chatml") -> list[int]:
    """The conversation followed by the opening of an assistant turn: the ids to generate from.
    Stop generating at `end_of_turn_id(tokenizer, template)`."""
    check_template(tokenizer, template)
    tpl = _template(template)
    spans = [(span, False) for message in messages for span in tpl.spans(message)]
    spans += [(span, False) for span in tpl.generation_prompt()]
    return _encode(_Encoder(tokenizer, tpl), spans)[0]


# ---- fitting a context ---------------------------------------------------------------------------
def truncate(samples: Iterable[Rendered], context: int) -> tuple[list[Rendered], dict[str, int]]:
    """Samples cut to `context` tokens, and counts for summary.json.

    A cut keeps labels[:context]: the last kept label still names token `context` (cut off), a
    valid target, as in pre-training windows. A sample left with no scored token is dropped and
    counted (its loss would be 0/0, a NaN, or a silent 0.0 in a batch mean)."""
    kept: list[Rendered] = []
    counts = {"samples": 0, "truncated": 0, "dropped_no_scored_tokens": 0}
    for sample in samples:
        counts["samples"] += 1
        if len(sample.ids) > context:
            sample = Rendered(sample.ids[:context], sample.labels[:context])
            counts["truncated"] += 1
        if sample.n_scored == 0:
            counts["dropped_no_scored_tokens"] += 1
            continue
        kept.append(sample)
    counts["kept"] = len(kept)
    return kept, counts
