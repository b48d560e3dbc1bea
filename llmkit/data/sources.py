"""Text sources: where documents come from. Each returns a list of (name, text) documents.

`stdlib` is the offline default corpus: every Python installation carries the pydoc topic texts
(`pydoc_data.topics`) and the standard library's module sources, so it needs no download.
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

from llmkit.registry import Registry

Document = tuple[str, str]
SOURCES: Registry[list[Document]] = Registry("data source")


@SOURCES.register("stdlib")
def stdlib_corpus(max_bytes: int | None = None, **_: object) -> list[Document]:
    """pydoc topic texts, then the top-level standard-library modules, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [(f"pydoc:{name}", topics[name]) for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs += [(f"stdlib:{p.name}", p.read_text(encoding="utf-8", errors="replace")) for p in sorted(stdlib.glob("*.py"))]
    return _truncate(docs, max_bytes)


@SOURCES.register("text")
def text_files(path: str | list[str] | None = None, max_bytes: int | None = None, **_: object) -> list[Document]:
    """Local text files: a path, a glob, or a list of them; each file is one document."""
    if not path:
        raise ValueError("data=text needs data.path=<file, glob or list of them>")
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
    docs = [(f, Path(f).read_text(encoding="utf-8", errors="replace")) for f in files]
    return _truncate(docs, max_bytes)


def _truncate(docs: list[Document], max_bytes: int | None) -> list[Document]:
    """Keep documents in order until max_bytes of UTF-8 text; the last one may be cut short."""
    if max_bytes is None:
        return docs
    kept, total = [], 0
    for name, text in docs:
        if total >= max_bytes:
            break
        data = text.encode("utf-8")[: max_bytes - total]
        kept.append((name, data.decode("utf-8", errors="ignore")))  # never split a character
        total += len(data)
    return kept
