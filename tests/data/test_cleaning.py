"""Cleaning: transforms change the text they should, each filter drops its planted bad documents and keeps the rest,
and the report says what went where and why."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmkit.data.cleaning import Cleaner, CleaningReport, clean_documents
from llmkit.data.sources import Document

PROSE = (
    "The river ran quietly past the mill, and the miller's daughter watched the boats go by.\n"
    "She counted them every morning before the bakers opened their doors on the square.\n"
)


def _corpus(n: int = 50, words: int = 300, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(3000)]
    return [(f"doc{i}", " ".join(rng.choices(vocab, k=words))) for i in range(n)]


def _names(docs: list[Document]) -> list[str]:
    return [name for name, _ in docs]


def _change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for i in positions:
        words[i] = "changed"
    return " ".join(words)


def test_defaults_remove_exact_duplicates_and_report_them() -> None:
    docs = _corpus(10)
    planted = docs + [("copy_of_doc3", docs[3][1]), ("copy_of_doc0", docs[0][1]), ("again_doc3", docs[3][1])]
    kept, report = clean_documents(planted)
    assert kept == docs
    d = report.to_dict()
    assert (d["documents_in"], d["documents_out"]) == (13, 10)
    assert d["chars_out"] == sum(len(t) for _, t in docs)
    assert d["chars_in"] == d["chars_out"] + 2 * len(docs[3][1]) + len(docs[0][1])
    exact = d["filters"]["exact_dedup"]
    assert exact["removed"] == 3 and exact["examples"] == ["copy_of_doc3", "copy_of_doc0", "again_doc3"]
    assert exact["chars"] == 2 * len(docs[3][1]) + len(docs[0][1])
    assert "sha256" in exact["reason"]
    assert "near_dedup" not in d["filters"]  # off unless asked for


def test_near_duplicates_removed_distinct_and_boilerplate_documents_kept() -> None:
    distinct = _corpus(50)
    header = "Archive of the example society. All rights reserved. Reproduced with permission of the editors. " * 3
    boilerplate = [(f"page{i}", header + text) for i, (_, text) in enumerate(_corpus(10, words=200, seed=1))]
    original = distinct[12][1]
    planted = [
        ("few_words_changed", _change_words(original, [30, 130, 230])),
        ("paragraph_appended", original + "\n\nA short closing paragraph that the copy added at the end of it."),
    ]
    kept, report = clean_documents(distinct + planted[:1] + boilerplate + planted[1:], near_dedup={"threshold": 0.8})
    assert _names(kept) == _names(distinct + boilerplate)
    near = report.to_dict()["filters"]["near_dedup"]
    assert near["removed"] == 2 and near["examples"] == ["few_words_changed", "paragraph_appended"]
    assert "Jaccard" in near["reason"] and "0.8" in near["reason"]
    assert report.to_dict()["filters"]["exact_dedup"]["removed"] == 0


def test_near_dedup_options_are_checked() -> None:
    with pytest.raises(TypeError, match="thresh"):
        Cleaner(near_dedup={"thresh": 0.8})


def test_nfkc_folds_compatibility_characters_and_nfc_keeps_them() -> None:
    docs = [("lig", "ﬁne ﬂour"), ("plain", "fine flour made here")]
    kept, report = clean_documents(docs, normalize="NFKC")
    assert kept[0] == ("lig", "fine flour")
    assert report.modified["normalize"] == 1
    kept, report = clean_documents(docs)  # NFC: the ligature is a character of its own
    assert kept[0] == ("lig", "ﬁne ﬂour") and report.modified["normalize"] == 0
    kept, _ = clean_documents([("e", "cafe\u0301")])  # NFC composes e + combining acute
    assert kept == [("e", "café")]


def test_bad_normalize_value_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="NFC, NFKC, NFD, NFKD or None.*'nfkc'"):
        Cleaner(normalize="nfkc")


def test_unknown_option_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="dedup"):
        Cleaner(dedup=True)  # type: ignore[call-arg]


def test_control_characters_removed_newlines_and_tabs_kept() -> None:
    text = "line one\r\nline\x00 two\x07\n\tindented\u200b\ufeff word\x1b[0m\rold mac"
    kept, report = clean_documents([("ctl", text)])
    assert kept == [("ctl", "line one\nline two\n\tindented word[0m\nold mac")]
    assert report.modified["strip_control"] == 1
    kept, report = clean_documents([("ctl", text)], strip_control=False)
    assert kept[0][1] == text and "strip_control" not in report.modified


def test_zero_width_joiners_survive_control_stripping() -> None:
    persian = "می\u200cخواهم"  # ZWNJ is part of the spelling
    assert clean_documents([("fa", persian)])[0] == [("fa", persian)]


def test_html_stripped_to_text() -> None:
    page = (
        "<!DOCTYPE html><html><head><title>Menu</title><style>p { color: red }</style>"
        "<script>if (a < b && c) { document.write('<p>hidden</p>') }</script></head>"
        "<body><h1>Fish &amp; Chips</h1><p>Fresh&nbsp;cod, &lt;daily&gt; &#233;dition</p><!-- a comment -->"
        "<ul><li>salt</li><li>vinegar</li></ul><br/>Tel: 5&nbsp;pounds</body></html>"
    )
    kept, report = clean_documents([("menu.html", page)], strip_html=True, normalize="NFKC")
    text = kept[0][1]
    assert "<" not in text.replace("<daily>", "") and "color" not in text and "hidden" not in text and "comment" not in text
    assert "Fish & Chips" in text and "Fresh cod, <daily> édition" in text
    assert text.split("\n").count("salt") == 1 and "salt\nvinegar" in text.replace("\n\n", "\n")  # blocks stay apart
    assert report.modified["strip_html"] == 1
    assert clean_documents([("p", "<p>x</p>")])[0] == [("p", "<p>x</p>")]  # off by default


def test_length_bounds_apply_after_transforms() -> None:
    docs = [("empty", ""), ("tiny", "hi"), ("ok", "x" * 50), ("long", "y" * 500), ("tags", "<b>hi</b>")]
    kept, report = clean_documents(docs, min_chars=10, max_chars=100, strip_html=True)
    assert _names(kept) == ["ok"]
    f = report.to_dict()["filters"]
    assert (f["min_chars"]["removed"], f["min_chars"]["examples"]) == (3, ["empty", "tiny", "tags"])
    assert (f["max_chars"]["removed"], f["max_chars"]["chars"]) == (1, 500)
    with pytest.raises(ValueError, match="max_chars"):
        Cleaner(min_chars=10, max_chars=5)


def test_quality_rules_drop_planted_junk_and_keep_prose() -> None:
    docs = [
        ("prose", PROSE),
        ("symbols", "#$%^&*()!@#$%^&*()_+{}|:<>?~" * 20 + " some words"),
        ("repeated_lines", "Click here to subscribe!\n" * 8 + PROSE),
        ("minified", "data=" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 400),  # one 14,000-character line
        ("code", "def f(x):\n    return x + 1\n\nprint(f(2))\n"),
    ]
    kept, report = clean_documents(docs, quality={})
    assert _names(kept) == ["prose", "code"]
    f = report.to_dict()["filters"]
    assert f["quality.min_alnum_fraction"]["examples"] == ["symbols"]
    assert f["quality.max_duplicate_line_fraction"]["examples"] == ["repeated_lines"]
    assert f["quality.max_mean_line_length"]["examples"] == ["minified"]
    # a rule set to None is off; the others keep their defaults
    kept, report = clean_documents(docs, quality={"max_mean_line_length": None, "min_alnum_fraction": None})
    assert _names(kept) == ["prose", "symbols", "minified", "code"]
    assert "quality.max_mean_line_length" not in report.filters
    with pytest.raises(TypeError, match="min_alpha"):
        Cleaner(quality={"min_alpha": 0.5})


def test_language_filter_keeps_allowed_scripts() -> None:
    docs = [
        ("en", PROSE),
        ("ru", "Река тихо текла мимо мельницы, и дочь мельника смотрела на лодки."),
        ("mixed", PROSE + "Река тихо текла мимо мельницы."),  # mostly Latin: kept at 0.8
        ("zh", "河水静静地流过磨坊，磨坊主的女儿看着船只经过。"),
        ("el", "Το ποτάμι κυλούσε ήσυχα δίπλα στον μύλο."),
        ("digits", "12345 67890 +-*/"),  # no letters at all
    ]
    kept, report = clean_documents(docs, language={"scripts": ["latin"], "min_fraction": 0.8})
    assert _names(kept) == ["en", "mixed"]
    lang = report.to_dict()["filters"]["language"]
    assert lang["removed"] == 4 and lang["examples"] == ["ru", "zh", "el", "digits"] and "latin" in lang["reason"]
    kept, _ = clean_documents(docs, language={"scripts": ["Cyrillic", "CJK"], "min_fraction": 0.8})
    assert _names(kept) == ["ru", "zh"]


def test_report_written_as_json_and_summarised(tmp_path: Path) -> None:
    docs = _corpus(5) + [("dup", _corpus(5)[0][1]), ("short", "x")]
    kept, report = clean_documents(docs, min_chars=5, quality={}, near_dedup={})
    path = tmp_path / "reports" / "cleaning.json"
    report.write(path)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == report.to_dict()
    assert list(loaded["filters"]) == [  # the order they run in: cheap before expensive
        "min_chars", "quality.min_alnum_fraction", "quality.max_duplicate_line_fraction", "quality.max_mean_line_length",
        "exact_dedup", "near_dedup",
    ]
    assert loaded["filters"]["min_chars"]["examples"] == ["short"]
    assert list(tmp_path.joinpath("reports").iterdir()) == [path]  # no temporary file left behind
    summary = report.summary()
    assert "7 -> 5 documents" in summary and "exact_dedup: removed 1" in summary and "dup" in summary


def test_cleaner_streams_and_its_dedup_spans_calls() -> None:
    seen: list[str] = []

    def docs() -> Iterator[Document]:
        for name, text in _corpus(3):
            seen.append(name)
            yield name, text

    cleaner = Cleaner()
    stream = cleaner(docs())
    assert next(stream)[0] == "doc0" and seen == ["doc0"]  # lazy: one document in, one out
    assert isinstance(cleaner.report, CleaningReport) and cleaner.report.documents_out == 1
    assert _names(list(stream)) == ["doc1", "doc2"]
    assert list(cleaner(_corpus(3))) == []  # a second shard with the same texts: all duplicates
    assert cleaner.report.documents_in == 6 and cleaner.report.filters["exact_dedup"].removed == 3
