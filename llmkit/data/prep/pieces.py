"""A data component's input cut into pieces: the units that preparation tasks read and clean independently.

A piece is a run of consecutive input files (at least `piece_bytes` of them, by size on disk, unless the list ends),
so pieces depend on the input alone, never on the number of tasks, and the concatenation of the pieces' documents,
in piece order, is the component's document stream exactly as one process reads it. Only sources that read file by
file (`sources.FILE_READERS`: text, jsonl) are cut; a component with `max_bytes` (a budget over the whole stream),
with `split_by: tail` (which needs the whole stream), or from another source (stdlib, hf; read through the source
itself) is one piece.

Reading a piece names the file in any error: a task far away on a cluster must say which input broke it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llmkit.data.sources import FILE_READERS, SOURCES, Document, _truncate, resolve_files

COMPONENT_KEYS = ("source", "weight", "split_by")  # a component's own settings; the rest go to its source
PIECE_BYTES = 64 << 20


class InputError(ValueError):
    """An input file that cannot be read or parsed; the message names it."""


@dataclass(frozen=True)
class Piece:
    component: str
    index: int  # position among the component's pieces, in input order
    files: tuple[str, ...] | None  # None: the whole component, read through its source

    @property
    def key(self) -> str:
        return f"{self.component}/{self.index:05d}"


def component_pieces(name: str, options: dict[str, Any], split: str, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """The pieces of one component; `split` is the split method it uses (its split_by, else data.split)."""
    source = options.get("source", "text")
    if source not in FILE_READERS:
        return [Piece(name, 0, None)]
    files = resolve_files(options.get("path"), source)  # fails at once, naming the pattern, when nothing matches
    if options.get("max_bytes") is not None or split == "tail":
        return [Piece(name, 0, tuple(files))]
    groups: list[list[str]] = [[]]
    size = 0
    for file in files:
        if groups[-1] and size >= piece_bytes:
            groups.append([])
            size = 0
        groups[-1].append(file)
        size += os.path.getsize(file)
    return [Piece(name, i, tuple(group)) for i, group in enumerate(groups)]


def read_documents(options: dict[str, Any]) -> Iterator[Document]:
    """Every document of a component, through its source."""
    opts = {k: v for k, v in options.items() if k not in COMPONENT_KEYS}
    yield from SOURCES.build(options.get("source", "text"), **opts)


def read_piece(options: dict[str, Any], piece: Piece) -> Iterator[Document]:
    """The piece's documents, in order; an unreadable or corrupt input raises InputError naming the file."""
    if piece.files is None:
        yield from read_documents(options)
        return
    reader = FILE_READERS[options.get("source", "text")]
    opts = {k: v for k, v in options.items() if k not in COMPONENT_KEYS and k not in ("path", "max_bytes")}
    docs = (doc for file in piece.files for doc in _named(reader(file, **opts), file))
    yield from _truncate(docs, options.get("max_bytes"))


# what a bad file raises: missing or unreadable (OSError), a damaged .gz (BadGzipFile is an OSError, EOFError when cut
# short, zlib.error inside), bad JSON or a missing field (ValueError; sources name the file and line already)
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def _named(docs: Iterator[Document], where: str) -> Iterator[Document]:
    try:
        yield from docs
    except InputError:
        raise
    except _READ_ERRORS as err:
        message = str(err)
        if where not in message:
            message = f"{where}: cannot read it: {type(err).__name__}: {message}"
        raise InputError(message) from err
