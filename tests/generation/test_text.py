"""Streaming text: characters split over byte tokens print whole; stop strings never print."""

from collections.abc import Iterable

import pytest

from llmkit.generation import IncrementalDetokenizer, StopStrings


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case of sentencepiece's byte fallback."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode(errors="replace")


def test_characters_split_over_byte_tokens_print_whole() -> None:
    tokenizer, text = ByteTokenizer(), "h€llo, wörld 🙂!"
    pieces = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt "))
    out = [pieces.push(t) for t in tokenizer.encode(text)] + [pieces.flush()]
    assert "".join(out) == text
    assert not any("\ufffd" in p for p in out)
    assert out[1:4] == ["", "", "€"]  # held back until the third byte of €


def test_an_incomplete_character_at_the_end_flushes_as_replacement() -> None:
    tokenizer = ByteTokenizer()
    pieces = IncrementalDetokenizer(tokenizer)
    assert pieces.push(ord("a")) == "a"
    assert pieces.push("€".encode()[0]) == ""
    assert pieces.flush() == "\ufffd"


def _cut(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    cutter = StopStrings(stops)
    out = []
    for piece in pieces:
        out.append(cutter.push(piece))
        if cutter.stopped:
            return out, True
    return out + [cutter.flush()], False


def test_stop_string_split_over_pieces_is_never_printed() -> None:
    out, stopped = _cut(["\n\n"], ["one\n", "\ntwo"])
    assert stopped and "".join(out) == "one"
    assert out[0] == "one"  # the newline was held back: it might have started the stop string


def test_held_back_text_is_released_when_it_does_not_become_a_stop_string() -> None:
    out, stopped = _cut(["END"], ["the E", "ND", "x"])
    assert stopped and "".join(out) == "the "
    out, stopped = _cut(["END"], ["the E", "nd of it", " E"])
    assert not stopped and "".join(out) == "the End of it E"
    assert out[:2] == ["the ", "End of it"]


@pytest.mark.parametrize("stops", [[], [""]])
def test_no_stop_strings_pass_everything_through(stops: list[str]) -> None:
    out, stopped = _cut(stops, ["a", "b\n"])
    assert not stopped and out == ["a", "b\n", ""]


def test_earliest_stop_string_wins() -> None:
    out, stopped = _cut(["world", "lo"], ["hello world"])
    assert stopped and out == ["hel"]
