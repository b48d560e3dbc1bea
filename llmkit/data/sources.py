"""Text sources: where documents come from. Each yields (name, text) documents, lazily.

Sources are generators so that a large corpus streams instead of sitting in memory twice; a caller
that needs a list (to hash it, to split it) wraps the source in `list()`. Settings are checked
when the source is built (a bad path fails at once), records are read as they are consumed.

`stdlib` is the offline default corpus: every Python installation carries the pydoc topic texts
(`pydoc_data.topics`) and the standard library's module sources, so it needs no download.
`text` reads files, `jsonl` JSON lines, and `hf` anything Hugging Face `datasets` can load.
Every source takes `**_` so that the data config can pass the union of all sources' options.
"""

from __future__ import annotations

import glob
import gzip
import json
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from llmkit.registry import Registry

Document = tuple[str, str]
SOURCES: Registry[Iterator[Document]] = Registry("data source")


@SOURCES.register("stdlib")
def stdlib_corpus(max_bytes: int | None = None, **_: object) -> Iterator[Document]:
    """pydoc topic texts, then the top-level standard-library modules, in a fixed order."""
    return _truncate(_stdlib_documents(), max_bytes)


def _stdlib_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py")):
        yield f"stdlib:{p.name}", p.read_text(encoding="utf-8", errors="replace")


@SOURCES.register("text")
def text_files(path: str | list[str] | None = None, max_bytes: int | None = None, **_: object) -> Iterator[Document]:
    """Local text files: a path, a glob, or a list of them; each file is one document."""
    files = resolve_files(path, "text")
    return _truncate((doc for f in files for doc in read_text_file(f)), max_bytes)


def read_text_file(file: str, **_: object) -> Iterator[Document]:
    yield file, Path(file).read_text(encoding="utf-8", errors="replace")


@SOURCES.register("jsonl")
def jsonl_files(
    path: str | list[str] | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    max_bytes: int | None = None,
    **_: object,
) -> Iterator[Document]:
    """JSON-lines files (`.jsonl`, or `.jsonl.gz`): one document per record.

    `text_field` and `id_field` may be dotted paths ("meta.body"). A document is named by its
    `id_field` value, else "<file>:<line number>". Empty lines are skipped; a line that is not
    JSON, or a record without the field, fails naming the file and line."""
    files = resolve_files(path, "jsonl")
    return _truncate(_jsonl_documents(files, text_field, id_field), max_bytes)


def read_jsonl_file(file: str, text_field: str = "text", id_field: str | None = None, **_: object) -> Iterator[Document]:
    return _jsonl_documents([file], text_field, id_field)


# Sources whose documents come file by file, each file on its own: the file list can be cut into pieces that
# separate tasks read (llmkit/data/prep/pieces.py), and the pieces' documents, in order, are the source's documents.
FILE_READERS = {"text": read_text_file, "jsonl": read_jsonl_file}


def _jsonl_documents(files: list[str], text_field: str, id_field: str | None) -> Iterator[Document]:
    for file in files:
        with _open_text(file) as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{file}, line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err})") from err
                name = str(_field(record, id_field, where)) if id_field else f"{file}:{number}"
                yield name, _text(record, text_field, where)


def _open_text(file: str) -> IO[str]:
    if file.endswith(".gz"):
        return gzip.open(file, "rt", encoding="utf-8", errors="replace")
    return open(file, encoding="utf-8", errors="replace")


@SOURCES.register("hf")
def hf_dataset(
    dataset: str | None = None,
    data_files: str | list[str] | None = None,
    subset: str | None = None,
    split: str = "train",
    streaming: bool = True,
    text_field: str = "text",
    id_field: str | None = None,
    revision: str | None = None,
    max_bytes: int | None = None,
    **_: object,
) -> Iterator[Document]:
    """A Hugging Face `datasets` dataset: a hub id, a builder name with `data_files` ("json",
    "text", "parquet", ...), or a directory written by `save_to_disk`.

    Streaming (the default) reads records as they are consumed, so `max_bytes` of a huge hub
    dataset downloads only what it keeps. A document is named by its `id_field` value, else
    "<dataset>:<split>:<index>"."""
    if not dataset:
        raise ValueError(
            "data=hf needs data.source_options.dataset=<hub id, a builder such as json/parquet with "
            "data.source_options.data_files, or a save_to_disk directory>"
        )
    rows = _load_hf(dataset, data_files, subset, split, streaming, revision)
    docs = _hf_documents(rows, f"{dataset}:{split}", text_field, id_field)
    return _truncate(docs, max_bytes)


def _load_hf(
    dataset: str, data_files: Any, subset: str | None, split: str, streaming: bool, revision: str | None
) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets  # lazily: a heavy import that only this source needs
    except ImportError as err:
        raise ImportError("data=hf needs the Hugging Face datasets library: pip install datasets") from err
    saved = _saved_dataset_dir(dataset)
    if saved is not None:
        loaded = datasets.load_from_disk(str(saved))
        # a DatasetDict holds several splits; a single saved Dataset is the split itself
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if data_files is not None:  # config values may be OmegaConf lists; local paths may start with ~
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        data_files = [str(Path(f).expanduser()) if f.startswith("~") else f for f in files]
    return datasets.load_dataset(
        dataset, name=subset, data_files=data_files, split=split, streaming=streaming, revision=revision
    )


def _saved_dataset_dir(dataset: str) -> Path | None:
    """The directory if `dataset` names one written by `save_to_disk` (a Dataset or a DatasetDict)."""
    directory = Path(dataset).expanduser()
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if directory.is_dir() and any((directory / m).is_file() for m in markers):
        return directory
    return None


def _hf_documents(
    rows: Iterable[Mapping[str, Any]], prefix: str, text_field: str, id_field: str | None
) -> Iterator[Document]:
    for index, record in enumerate(rows):
        where = f"{prefix}, record {index}"
        name = str(_field(record, id_field, where)) if id_field else f"{prefix}:{index}"
        yield name, _text(record, text_field, where)


# ---- shared helpers ------------------------------------------------------------------------------
def resolve_files(path: str | list[str] | None, source: str) -> list[str]:
    """Files matching a path, a glob, or a list of them, in sorted order per pattern (eagerly, so
    that a typo fails when the source is built rather than half-way through a run)."""
    if not path:
        raise ValueError(f"data={source} needs data.path=<file, glob or list of them>")
    patterns = [path] if isinstance(path, str) else list(path)
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matched:
            raise FileNotFoundError(f"data.path: nothing matches '{pattern}'")
        matched_files = [f for f in matched if Path(f).is_file()]
        if not matched_files:
            raise FileNotFoundError(f"data.path: '{pattern}' matches only directories; use a glob such as '{pattern}/*.txt'")
        files += matched_files
    return files


def _field(record: Any, dotted: str, where: str) -> Any:
    """record["a"]["b"] for "a.b"; a key that itself contains dots is tried first."""
    if isinstance(record, Mapping) and dotted in record:
        return record[dotted]
    value = record
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"{where}: no field '{dotted}' in the record; its keys: {keys}")
        value = value[key]
    return value


def _text(record: Any, text_field: str, where: str) -> str:
    text = _field(record, text_field, where)
    if not isinstance(text, str):
        raise ValueError(f"{where}: field '{text_field}' holds {type(text).__name__}, not text")
    return text


def _truncate(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    """Pass documents on in order until max_bytes of UTF-8 text; the last one may be cut short.

    Stops pulling from `docs` as soon as the limit is reached, so a streamed source reads no more."""
    if max_bytes is None:
        yield from docs
        return
    total = 0
    if max_bytes <= 0:
        return
    for name, text in docs:
        data = text.encode("utf-8")[: max_bytes - total]
        total += len(data)
        yield name, data.decode("utf-8", errors="ignore")  # never split a character
        if total >= max_bytes:
            return
