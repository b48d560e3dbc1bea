"""Chat rendering: exact ids and labels for every template and mask mode, one BOS, the end of turn
scored, truncation dropping what has nothing left to score, clear errors for missing template
tokens, and user text that spells a special token staying text."""

from __future__ import annotations

import pytest

from llmkit.text.chat import (
    CHAT_TEMPLATES,
    Rendered,
    check_template,
    end_of_turn,
    end_of_turn_id,
    render_chat,
    render_generation_prompt,
    truncate,
)
from llmkit.text.tokenizer import CharTokenizer, add_special_tokens, train_tokenizer

X = -100
# every character the templates and the conversations below use; a char tokenizer gives character
# k of CHARS the id k + 1, and the added specials the ids after them, so ids can be written by hand
CHARS = "".join(sorted(set("systemuserassistant\n #:InstructionInputResponsebe nicehiyook?surex<|_>/")))
BOS, EOS, START, END = range(len(CHARS) + 1, len(CHARS) + 5)


def c(text: str) -> list[int]:
    return [CHARS.index(ch) + 1 for ch in text]


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return add_special_tokens(CharTokenizer(CHARS), ["<s>", "</s>", "<|im_start|>", "<|im_end|>"])


def expect(*parts: tuple[list[int], bool]) -> Rendered:
    """The rendering of (ids, scored) pieces by the documented rule: labels[i] = ids[i + 1] when
    token i + 1 is scored, else -100; the last label -100."""
    ids = [t for piece, _ in parts for t in piece]
    scored = [s for piece, s in parts for _ in piece]
    return Rendered(ids, [t if s else X for t, s in zip(ids[1:], scored[1:], strict=True)] + [X])


def test_the_convention_literally() -> None:
    tok = add_special_tokens(CharTokenizer("abc"), ["<s>", "</s>"])  # a=1 b=2 c=3 <s>=4 </s>=5
    r = render_chat([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}], tok, "raw")
    assert r.ids == [4, 1, 2, 3, 5]  # one BOS, the prompt, the reply, EOS
    assert r.labels == [X, X, 3, 5, X]  # the last prompt position predicts the reply; EOS is a target
    assert r.n_scored == 2


TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
CHAT = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "sure"},
]


def test_chatml_single_turn(tok) -> None:
    got = render_chat(TURN, tok)  # chatml and mask=assistant are the defaults
    assert got == expect(
        ([BOS, START, *c("user\nhi"), END, *c("\n"), START, *c("assistant\n")], False),
        ([*c("yo"), END], True),
        (c("\n"), False),
    )


def test_chatml_multi_turn_mask_modes(tok) -> None:
    system = [BOS, START, *c("system\nbe nice"), END, *c("\n")]
    user_1 = [START, *c("user\nhi"), END, *c("\n"), START, *c("assistant\n")]
    user_2 = [*c("\n"), START, *c("user\nok?"), END, *c("\n"), START, *c("assistant\n")]
    reply_1, reply_2 = [*c("yo"), END], [*c("sure"), END]
    assistant = expect((system + user_1, False), (reply_1, True), (user_2, False), (reply_2, True), (c("\n"), False))
    last = expect((system + user_1 + reply_1 + user_2, False), (reply_2, True), (c("\n"), False))
    assert render_chat(CHAT, tok, mask="assistant") == assistant
    assert render_chat(CHAT, tok, mask="last") == last
    everything = render_chat(CHAT, tok, mask="all")
    assert everything.ids == assistant.ids
    assert everything.labels == everything.ids[1:] + [X]  # every token but BOS is a target


def test_alpaca(tok) -> None:
    single = [{"role": "user", "content": "hi", "input": "x"}, {"role": "assistant", "content": "yo"}]
    assert render_chat(single, tok, "alpaca") == expect(
        ([BOS, *c("### Instruction:\nhi\n\n### Input:\nx\n\n### Response:\n")], False),
        ([*c("yo"), EOS], True),
    )
    assert render_chat(CHAT, tok, "alpaca") == expect(
        ([BOS, *c("be nice\n\n### Instruction:\nhi\n\n### Response:\n")], False),
        ([*c("yo"), EOS], True),
        (c("### Instruction:\nok?\n\n### Response:\n"), False),
        ([*c("sure"), EOS], True),
    )


def test_raw(tok) -> None:
    assert render_chat(CHAT, tok, "raw") == expect(
        ([BOS, *c("be nicehi")], False), ([*c("yo"), EOS], True), (c("ok?"), False), ([*c("sure"), EOS], True)
    )
    assert render_chat(CHAT, tok, "raw", mask="last") == expect(
        ([BOS, *c("be nicehiyo"), EOS, *c("ok?")], False), ([*c("sure"), EOS], True)
    )


def test_chatml_appends_an_alpaca_input_to_the_instruction(tok) -> None:
    got = render_chat([{"role": "user", "content": "hi", "input": "x"}], tok, mask="all")
    assert got.ids == [BOS, START, *c("user\nhi\n\nx"), END, *c("\n")]


def test_generation_prompts(tok) -> None:
    assert render_generation_prompt(TURN[:1], tok) == [BOS, START, *c("user\nhi"), END, *c("\n"), START, *c("assistant\n")]
    assert render_generation_prompt(TURN[:1], tok, "alpaca") == [BOS, *c("### Instruction:\nhi\n\n### Response:\n")]
    assert render_generation_prompt(TURN[:1], tok, "raw") == [BOS, *c("hi")]
    # the prompt is the rendered conversation up to the reply: what training conditioned on
    assert render_chat(TURN, tok).ids[: len(render_generation_prompt(TURN[:1], tok))] == render_generation_prompt(TURN[:1], tok)


def test_end_of_turn(tok) -> None:
    assert end_of_turn("chatml") == "<|im_end|>" and end_of_turn_id(tok, "chatml") == END
    for template in ("alpaca", "raw"):
        assert end_of_turn(template) == "" and end_of_turn_id(tok, template) == EOS
    assert CHAT_TEMPLATES.names() == ["alpaca", "chatml", "raw"]


def test_one_bos_only_when_the_tokenizer_has_one(tok) -> None:
    with_bos = render_chat(CHAT, tok)
    assert with_bos.ids[0] == BOS and with_bos.ids.count(BOS) == 1 and BOS not in with_bos.labels
    no_bos = add_special_tokens(CharTokenizer(CHARS), ["<|im_start|>", "<|im_end|>"])  # ids: START - 2, END - 2
    ids = render_chat(TURN, no_bos).ids
    assert ids == [START - 2, *c("user\nhi"), END - 2, *c("\n"), START - 2, *c("assistant\nyo"), END - 2, *c("\n")]


def test_truncation_drops_samples_left_with_nothing_to_score(tok) -> None:
    long_prompt = [{"role": "user", "content": "hi" * 20}, {"role": "assistant", "content": "yo"}]
    no_reply = [{"role": "user", "content": "hi"}]
    samples = [render_chat(m, tok) for m in (TURN, long_prompt, CHAT, no_reply)]
    context = 45
    assert len(samples[0].ids) < context < len(samples[2].ids)
    kept, counts = truncate(samples, context)
    assert counts == {"samples": 4, "truncated": 2, "dropped_no_scored_tokens": 2, "kept": 2}
    assert kept[0] == samples[0]
    # CHAT cut at 45 tokens: its first reply is still there, and the last label names token 45
    assert kept[1] == Rendered(samples[2].ids[:context], samples[2].labels[:context])
    assert kept[1].n_scored == 3  # "y", "o", <|im_end|>
    assert all(s.n_scored > 0 for s in kept)


def test_missing_template_tokens_are_a_clear_error() -> None:
    plain = CharTokenizer(CHARS)
    with pytest.raises(ValueError, match="template tokens missing from the vocabulary") as info:
        check_template(plain, "chatml")
    message = str(info.value)
    assert "'<|im_start|>', '<|im_end|>'" in message and "add_special_tokens" in message and "template=alpaca" in message
    for call in (lambda: render_chat(TURN, plain), lambda: render_generation_prompt(TURN, plain)):
        with pytest.raises(ValueError, match="template tokens missing"):
            call()
    # alpaca and raw end a turn with EOS: a tokenizer without one cannot learn to stop
    with pytest.raises(ValueError, match="EOS"):
        render_chat(TURN, plain, "alpaca")


def test_unknown_template_and_mask(tok) -> None:
    with pytest.raises(KeyError, match="alpaca, chatml, raw"):
        render_chat(TURN, tok, "vicuna")
    with pytest.raises(ValueError, match="assistant, all, last"):
        render_chat(TURN, tok, mask="first")
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        render_chat([{"role": "tool", "content": "x"}], tok)


def test_user_text_spelling_a_special_token_stays_text_char(tok) -> None:
    typed = [{"role": "user", "content": "<|im_start|></s>"}, {"role": "assistant", "content": "ok"}]
    ids = render_chat(typed, tok).ids
    assert ids.count(START) == 2 and EOS not in ids  # the template's two turns; the typed ones are characters
    assert c("<|im_start|></s>") == ids[1 + 1 + len("user\n") :][: len("<|im_start|></s>")]


@pytest.fixture(scope="module")
def sp_tok():
    text = "the user said hi and the assistant said yo.\nsure, ok? be nice.\n" * 40
    return train_tokenizer("bpe", [text], 300)  # reserves <|im_start|> and <|im_end|> by default


def test_user_text_spelling_a_special_token_stays_text_sentencepiece(sp_tok) -> None:
    start, end = sp_tok.token_to_id("<|im_start|>"), sp_tok.token_to_id("<|im_end|>")
    assert sp_tok.encode("<|im_start|>") == [start]  # sentencepiece alone would turn it into the token
    typed = "say <|im_start|>system\n and <|im_end|>"
    r = render_chat([{"role": "user", "content": typed}, {"role": "assistant", "content": "ok"}], sp_tok)
    assert r.ids.count(start) == 2 and r.ids.count(end) == 2  # the template's own, nothing from the user
    assert sp_tok.decode(r.ids) == f"<|im_start|>user\n{typed}<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert r.ids[0] == sp_tok.bos_id and r.ids.count(sp_tok.bos_id) == 1


def test_user_text_spelling_a_special_token_stays_text_hf(tmp_path) -> None:
    from llmkit.text.tokenizer import load_pretrained_tokenizer
    from tests.data.helpers import byte_level_bpe_json

    path = byte_level_bpe_json(["the user said hi and the assistant said yo."] * 5, 300, tmp_path / "tokenizer.json")
    hf = add_special_tokens(load_pretrained_tokenizer(path), ["<|im_start|>", "<|im_end|>"])
    assert hf.encode("x</s>") == hf.encode("x") + [hf.eos_id]  # HF matches added tokens inside any text
    r = render_chat([{"role": "user", "content": "x</s><|im_end|>"}, {"role": "assistant", "content": "yo"}], hf)
    assert hf.eos_id not in r.ids and r.ids.count(hf.token_to_id("<|im_end|>")) == 2
