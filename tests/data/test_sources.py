"""Text sources: local files and globs, truncation, the offline stdlib corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.data.sources import SOURCES, stdlib_corpus, text_files


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def three_files(tmp_path: Path) -> Path:
    # written out of order, so sorting is what makes the order
    _write(tmp_path / "b.txt", "second file\n")
    _write(tmp_path / "c.txt", "third file\n")
    _write(tmp_path / "a.txt", "first file\n")
    _write(tmp_path / "notes.md", "not text\n")
    _write(tmp_path / "sub" / "d.txt", "nested file\n")
    return tmp_path


def test_glob_gives_one_document_per_file_in_sorted_order(three_files: Path) -> None:
    docs = text_files(path=str(three_files / "*.txt"))
    assert [Path(name).name for name, _ in docs] == ["a.txt", "b.txt", "c.txt"]
    assert [text for _, text in docs] == ["first file\n", "second file\n", "third file\n"]
    assert all(Path(name).is_absolute() for name, _ in docs)


def test_single_file_path(three_files: Path) -> None:
    docs = text_files(path=str(three_files / "c.txt"))
    assert docs == [(str(three_files / "c.txt"), "third file\n")]


def test_recursive_glob_and_directories_skipped(three_files: Path) -> None:
    names = [Path(name).name for name, _ in text_files(path=str(three_files / "**" / "*.txt"))]
    assert names == ["a.txt", "b.txt", "c.txt", "d.txt"]
    # "*" also matches the directory sub/, which is not a document
    everything = [Path(name).name for name, _ in text_files(path=str(three_files / "*"))]
    assert everything == ["a.txt", "b.txt", "c.txt", "notes.md"]


def test_list_of_patterns_keeps_the_list_order(three_files: Path) -> None:
    docs = text_files(path=[str(three_files / "c.txt"), str(three_files / "a.txt"), str(three_files / "*.md")])
    assert [Path(name).name for name, _ in docs] == ["c.txt", "a.txt", "notes.md"]


def test_pattern_matching_nothing_names_the_pattern(three_files: Path) -> None:
    pattern = str(three_files / "*.rst")
    with pytest.raises(FileNotFoundError, match="nothing matches") as info:
        text_files(path=pattern)
    assert pattern in str(info.value)
    # also when it is one pattern of several
    with pytest.raises(FileNotFoundError) as info:
        text_files(path=[str(three_files / "a.txt"), str(three_files / "missing.txt")])
    assert str(three_files / "missing.txt") in str(info.value)


@pytest.mark.parametrize("path", [None, "", []])
def test_missing_path_raises_value_error(path) -> None:
    with pytest.raises(ValueError, match="data.path"):
        text_files(path=path)


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
    [(_, text)] = text_files(path=str(tmp_path / "bad.txt"))
    assert text.startswith("ok ") and text.endswith(" end")
    assert "\ufffd" in text


def test_max_bytes_truncates_across_documents(tmp_path: Path) -> None:
    for name, char in [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]:
        _write(tmp_path / f"{name}.txt", char * 10)
    pattern = str(tmp_path / "*.txt")
    docs = text_files(path=pattern, max_bytes=25)
    assert [text for _, text in docs] == ["a" * 10, "b" * 10, "c" * 5]
    # a limit on a document boundary does not add an empty document
    assert [text for _, text in text_files(path=pattern, max_bytes=20)] == ["a" * 10, "b" * 10]
    assert [text for _, text in text_files(path=pattern, max_bytes=3)] == ["aaa"]
    # a limit above the total keeps everything
    assert len(text_files(path=pattern, max_bytes=1000)) == 4
    assert sum(len(t) for _, t in text_files(path=pattern, max_bytes=None)) == 40


def test_registry_builds_sources_and_ignores_extra_settings(three_files: Path) -> None:
    docs = SOURCES.build("text", path=str(three_files / "*.txt"), max_bytes=None, unrelated=1)
    assert len(docs) == 3
    assert set(SOURCES.names()) >= {"stdlib", "text"}
    with pytest.raises(KeyError, match="stdlib, text"):
        SOURCES.build("nope")


def test_stdlib_corpus_has_pydoc_topics_then_modules() -> None:
    docs = stdlib_corpus()
    names = [name for name, _ in docs]
    pydoc = [n for n in names if n.startswith("pydoc:")]
    modules = [n for n in names if n.startswith("stdlib:")]
    assert len(pydoc) > 10 and len(modules) > 50
    assert len(pydoc) + len(modules) == len(names)
    assert names == pydoc + modules  # topics first
    assert pydoc == sorted(pydoc) and modules == sorted(modules)
    assert "stdlib:os.py" in modules and "pydoc:assert" in pydoc
    assert all(text.strip() for name, text in docs if name.startswith("pydoc:"))
    assert "def " in dict(docs)["stdlib:os.py"]


def test_stdlib_corpus_is_deterministic_and_truncates() -> None:
    first = stdlib_corpus(max_bytes=200_000)
    assert first == stdlib_corpus(max_bytes=200_000)
    assert sum(len(t.encode("utf-8")) for _, t in first) == 200_000
    assert stdlib_corpus() == stdlib_corpus()
    # truncation keeps a prefix of the full corpus
    full = stdlib_corpus()
    assert [n for n, _ in first] == [n for n, _ in full[: len(first)]]
    assert first[:-1] == full[: len(first) - 1]
    assert full[len(first) - 1][1].startswith(first[-1][1])


def test_max_bytes_counts_utf8_bytes_and_never_splits_a_character(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("é" * 10, encoding="utf-8")  # 2 bytes per character
    (text,) = [t for _, t in text_files(path=str(tmp_path / "a.txt"), max_bytes=7)]
    assert text == "ééé"  # 6 bytes; the 4th character would need bytes 7-8


def test_path_matching_only_directories_says_so(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    with pytest.raises(FileNotFoundError, match="matches only directories"):
        text_files(path=str(tmp_path / "corpus"))
