"""Text sources: local files and globs, JSON lines, Hugging Face datasets (local files only, never the
hub), truncation, the offline stdlib corpus. Sources are generators; tests wrap them in list()."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# never touch the Hugging Face hub, even if a test goes wrong (read when datasets is first imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmkit.data import sources  # noqa: E402
from llmkit.data.sources import SOURCES, Document  # noqa: E402


def text_files(**options) -> list[Document]:
    return list(sources.text_files(**options))


def stdlib_corpus(**options) -> list[Document]:
    return list(sources.stdlib_corpus(**options))


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
    assert len(list(docs)) == 3
    assert SOURCES.names() == ["hf", "jsonl", "stdlib", "text"]
    with pytest.raises(KeyError, match="hf, jsonl, stdlib, text"):
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


# ---- streaming -----------------------------------------------------------------------------------
def test_sources_are_lazy_iterators(three_files: Path) -> None:
    docs = SOURCES.build("text", path=str(three_files / "*.txt"))
    assert iter(docs) is docs  # a generator, not a list
    assert next(docs)[1] == "first file\n"
    stdlib = SOURCES.build("stdlib")
    assert next(stdlib)[0].startswith("pydoc:")


def test_truncation_stops_pulling_from_the_source() -> None:
    pulled = []

    def endless():
        for i in range(10**9):
            pulled.append(i)
            yield f"doc{i}", "x" * 10

    docs = list(sources._truncate(endless(), max_bytes=25))
    assert [len(t) for _, t in docs] == [10, 10, 5]
    assert pulled == [0, 1, 2]  # a streamed source reads nothing past the limit
    assert list(sources._truncate(endless(), max_bytes=0)) == []


# ---- jsonl ---------------------------------------------------------------------------------------
def _jsonl(path: Path, lines: list[str], compress: bool = False) -> Path:
    import gzip

    data = "".join(line + "\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def jsonl(**options) -> list[Document]:
    return list(SOURCES.build("jsonl", **options))


def test_jsonl_one_document_per_record_named_by_file_and_line(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", ['{"text": "first", "n": 1}', "", "   ", '{"text": "second\\nline"}'])
    assert jsonl(path=str(f)) == [(f"{f}:1", "first"), (f"{f}:4", "second\nline")]  # empty lines skipped


def test_jsonl_id_field_and_dotted_text_field(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", ['{"meta": {"body": "deep", "id": 7}}', '{"meta.body": "literal key", "meta": {"id": 8}}'])
    assert jsonl(path=str(f), text_field="meta.body", id_field="meta.id") == [("7", "deep"), ("8", "literal key")]


def test_jsonl_gzip_glob_and_list_of_paths(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl.gz", ['{"text": "ä gz"}'], compress=True)
    b = _jsonl(tmp_path / "b.jsonl", ['{"text": "plain"}'])
    assert jsonl(path=str(tmp_path / "*.jsonl*")) == [(f"{a}:1", "ä gz"), (f"{b}:1", "plain")]
    assert [t for _, t in jsonl(path=[str(b), str(a)])] == ["plain", "ä gz"]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', '{"text": broken'])
    with pytest.raises(ValueError, match="line 2: not valid JSON") as info:
        jsonl(path=str(f))
    assert str(f) in str(info.value)


def test_jsonl_missing_field_names_field_file_line_and_keys(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', '{"body": "x", "id": 1}'])
    with pytest.raises(ValueError, match=r"line 2: no field 'text' in the record; its keys: \['body', 'id'\]") as info:
        jsonl(path=str(f))
    assert str(f) in str(info.value)
    with pytest.raises(ValueError, match="no field 'meta.body'"):
        jsonl(path=str(f), text_field="meta.body")
    numbers = _jsonl(tmp_path / "b.jsonl", ['{"text": 12}'])
    with pytest.raises(ValueError, match="line 1: field 'text' holds int, not text"):
        jsonl(path=str(numbers))


def test_jsonl_path_errors_come_when_the_source_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data=jsonl needs data.path"):
        SOURCES.build("jsonl")
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        SOURCES.build("jsonl", path=str(tmp_path / "*.jsonl"))


def test_jsonl_max_bytes_and_extra_settings(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "a.jsonl", [f'{{"text": "{c * 10}"}}' for c in "abc"])
    assert [t for _, t in jsonl(path=str(f), max_bytes=15, dataset="ignored", split="x")] == ["a" * 10, "b" * 5]


# ---- hf (Hugging Face datasets, local files only) ------------------------------------------------
@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch):
    """datasets, forced offline, caching under tmp_path (the env variables above are only read at import)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def hf(**options) -> list[Document]:
    return list(SOURCES.build("hf", **options))


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_json_files(tmp_path: Path, hf_offline, streaming: bool) -> None:
    f = _jsonl(tmp_path / "a.jsonl", ['{"text": "zero", "id": "z"}', '{"text": "one", "id": "o"}'])
    docs = hf(dataset="json", data_files=str(f), streaming=streaming)
    assert docs == [("json:train:0", "zero"), ("json:train:1", "one")]
    assert hf(dataset="json", data_files=[str(f)], streaming=streaming, id_field="id") == [("z", "zero"), ("o", "one")]


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_parquet_files_nested_field_and_max_bytes(tmp_path: Path, hf_offline, streaming: bool) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"meta": [{"body": "a" * 10}, {"body": "b" * 10}, {"body": "c" * 10}]})
    pq.write_table(table, tmp_path / "a.parquet")
    files = str(tmp_path / "a.parquet")
    docs = hf(dataset="parquet", data_files=files, text_field="meta.body", streaming=streaming, max_bytes=15)
    assert docs == [("parquet:train:0", "a" * 10), ("parquet:train:1", "b" * 5)]


def test_hf_missing_text_field_names_it(tmp_path: Path, hf_offline) -> None:
    f = _jsonl(tmp_path / "a.jsonl", ['{"content": "x"}'])
    with pytest.raises(ValueError, match=r"json:train, record 0: no field 'text' in the record; its keys: \['content'\]"):
        hf(dataset="json", data_files=str(f))


def test_hf_save_to_disk_directories(tmp_path: Path, hf_offline) -> None:
    datasets = hf_offline
    datasets.Dataset.from_dict({"text": ["s0", "s1"]}).save_to_disk(str(tmp_path / "one"))
    splits = {"train": ["t0", "t1"], "validation": ["v0"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "many")
    )
    assert hf(dataset=str(tmp_path / "one")) == [(f"{tmp_path / 'one'}:train:0", "s0"), (f"{tmp_path / 'one'}:train:1", "s1")]
    assert [t for _, t in hf(dataset=str(tmp_path / "many"), split="validation")] == ["v0"]
    assert [t for _, t in hf(dataset=str(tmp_path / "many"))] == ["t0", "t1"]


def test_hf_needs_a_dataset() -> None:
    with pytest.raises(ValueError, match="data.source_options.dataset"):
        SOURCES.build("hf", path="unused")


def test_hf_without_datasets_says_how_to_install(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        SOURCES.build("hf", dataset="json")
