"""Cleaning: text transforms (HTML, unicode normalisation, control characters), then document filters (length,
quality, language, exact and near duplicates), with a report of what each step removed or changed, and why.

    docs, report = clean_documents(SOURCES.build("stdlib"), near_dedup={"threshold": 0.8}, quality={})
    print(report.summary())

A Cleaner is stateful: its dedup filters remember every document kept so far, across calls, so one Cleaner
streamed over several shards dedups across all of them (and its report adds them up).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from llmkit.data.dedup import ExactDuplicateFilter, NearDuplicateFilter
from llmkit.data.files import write_json_atomic
from llmkit.data.sources import Document

NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
_EXAMPLES = 5


@dataclass
class FilterStats:
    reason: str
    removed: int = 0
    chars: int = 0
    examples: list[str] = field(default_factory=list)


class CleaningReport:
    """Documents and characters in and out; per filter what it removed and why; per transform the docs it changed.

    A filter's `chars` are those of the removed documents after transforms, so chars_in - chars_out also counts
    what the transforms removed.
    """

    def __init__(self) -> None:
        self.documents_in = self.documents_out = self.chars_in = self.chars_out = 0
        self.filters: dict[str, FilterStats] = {}
        self.modified: dict[str, int] = {}

    def count_removed(self, filter_name: str, doc_name: str, text: str) -> None:
        stats = self.filters[filter_name]
        stats.removed += 1
        stats.chars += len(text)
        if len(stats.examples) < _EXAMPLES:
            stats.examples.append(doc_name)

    def to_dict(self) -> dict:
        return {
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "filters": {name: vars(stats) for name, stats in self.filters.items()},
            "modified": dict(self.modified),
        }

    def write(self, path: Path) -> None:
        """JSON, written atomically: readers never see half a report."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(path), self.to_dict())

    def summary(self) -> str:
        kept = self.documents_out / self.documents_in if self.documents_in else 1.0
        lines = [
            f"cleaning: {self.documents_in:,} -> {self.documents_out:,} documents ({kept:.1%} kept), "
            f"{self.chars_in:,} -> {self.chars_out:,} characters"
        ]
        for name, s in self.filters.items():
            example = f"; e.g. {', '.join(s.examples[:3])}" if s.examples else ""
            lines.append(f"  {name}: removed {s.removed:,} ({s.chars:,} chars): {s.reason}{example}")
        if self.modified:
            lines.append("  modified: " + ", ".join(f"{name} {n:,}" for name, n in self.modified.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Filter:
    name: str
    reason: str
    rejects: Callable[[str, str], bool]  # (doc name, text) -> True to drop the document


class Cleaner:
    """Streams documents through the transforms, then the filters, cheap before expensive; yields the kept ones."""

    def __init__(
        self,
        normalize: str | None = "NFC",
        strip_control: bool = True,
        strip_html: bool = False,
        min_chars: int = 1,
        max_chars: int | None = None,
        exact_dedup: bool = True,
        near_dedup: dict | None = None,
        quality: dict | None = None,
        language: dict | None = None,
    ) -> None:
        if normalize is not None and normalize not in NORMAL_FORMS:
            raise ValueError(f"normalize must be one of {', '.join(NORMAL_FORMS)} or None, got {normalize!r}")
        if max_chars is not None and max_chars < min_chars:
            raise ValueError(f"max_chars={max_chars} is below min_chars={min_chars}")
        self._transforms = _transforms(normalize, strip_control, strip_html)
        self._filters = _length_filters(min_chars, max_chars)
        if quality is not None:
            self._filters += QualityRules(**quality).filters()
        if language is not None:
            self._filters.append(LanguageRule(**language).filter())
        if exact_dedup:
            self._filters.append(_exact_filter())
        if near_dedup is not None:
            self._filters.append(_near_filter(NearDuplicateFilter(**near_dedup)))
        self.report = CleaningReport()
        self.report.modified = {name: 0 for name, _ in self._transforms}
        self.report.filters = {f.name: FilterStats(f.reason) for f in self._filters}

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for name, text in docs:
            self.report.documents_in += 1
            self.report.chars_in += len(text)
            text = self._transform(text)
            # the first rejecting filter wins; dedup comes last, so it indexes only documents the cheap filters kept
            rejected = next((f for f in self._filters if f.rejects(name, text)), None)
            if rejected is not None:
                self.report.count_removed(rejected.name, name, text)
                continue
            self.report.documents_out += 1
            self.report.chars_out += len(text)
            yield name, text

    def _transform(self, text: str) -> str:
        for name, transform in self._transforms:
            new = transform(text)
            if new != text:
                self.report.modified[name] += 1
            text = new
        return text


def clean_documents(docs: Iterable[Document], **options: object) -> tuple[list[Document], CleaningReport]:
    cleaner = Cleaner(**options)  # type: ignore[arg-type]
    return list(cleaner(docs)), cleaner.report


# ---- transforms


def _transforms(normalize: str | None, strip_control: bool, strip_html: bool) -> list[tuple[str, Callable[[str], str]]]:
    transforms: list[tuple[str, Callable[[str], str]]] = []
    if strip_html:  # first: unescaped entities may bring characters that need normalising or stripping
        transforms.append(("strip_html", html_to_text))
    if normalize is not None:
        transforms.append(("normalize", functools.partial(_normalize, normalize)))
    if strip_control:
        transforms.append(("strip_control", remove_control_chars))
    return transforms


def _normalize(form: str, text: str) -> str:
    return text if unicodedata.is_normalized(form, text) else unicodedata.normalize(form, text)


def remove_control_chars(text: str) -> str:
    """\\r\\n and lone \\r become \\n; other Cc/Cf characters go, except \\n, \\t and the zero-width (non-)joiners."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _control_chars().sub("", text)


@functools.cache
def _control_chars() -> re.Pattern[str]:
    # ZWJ/ZWNJ (Cf) stay: Persian, the Indic scripts and emoji sequences need them to spell words right
    keep = {"\n", "\t", "\u200c", "\u200d"}
    chars = (chr(i) for i in range(sys.maxunicode + 1))
    drop = [ord(c) for c in chars if unicodedata.category(c) in ("Cc", "Cf") and c not in keep]  # one scan, ~0.3 s
    ranges: list[list[int]] = []
    for code in drop:  # as ranges: re matches a class of 25 ranges ten times faster than one of 224 characters
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1][1] = code
        else:
            ranges.append([code, code])
    return re.compile("[" + "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges) + "]")


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style", "template"})
    _BLOCK = frozenset(
        "address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr "
        "li main nav ol p pre section table td th title tr ul".split()
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # unescapes &amp; &#233; ... in the text it hands over
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")  # block boundaries must not glue the words on either side together

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(text: str) -> str:
    """Text content of an HTML document: tags, comments and script/style contents dropped, entities unescaped."""
    if "<" not in text and "&" not in text:
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    out = re.sub(r"[ \t]+\n", "\n", "".join(parser.parts))
    return re.sub(r"\n{3,}", "\n\n", out).strip()


# ---- filters


def _length_filters(min_chars: int, max_chars: int | None) -> list[_Filter]:
    filters = [_Filter("min_chars", f"shorter than {min_chars} characters after transforms", lambda _, t: len(t) < min_chars)]
    if max_chars is not None:
        too_long = lambda _, t: len(t) > max_chars
        filters.append(_Filter("max_chars", f"longer than {max_chars} characters after transforms", too_long))
    return filters


@dataclass(frozen=True)
class QualityRules:
    """Heuristics against boilerplate, spam and binary junk; None turns a rule off. `quality={}` gives these defaults."""

    min_alnum_fraction: float | None = 0.6  # of characters: letters, digits, combining marks or whitespace
    max_duplicate_line_fraction: float | None = 0.3  # of non-empty lines: repeats of an earlier line in the same doc
    max_mean_line_length: float | None = 10_000  # of non-empty lines: minified code and data blobs; prose paragraphs stay below

    def filters(self) -> list[_Filter]:
        rules = [
            ("min_alnum_fraction", "fewer than {:.0%} of characters are letters, digits or whitespace",
             lambda _, t: _alnum_fraction(t) < self.min_alnum_fraction),
            ("max_duplicate_line_fraction", "more than {:.0%} of non-empty lines repeat an earlier line",
             lambda _, t: _duplicate_line_fraction(t) > self.max_duplicate_line_fraction),
            ("max_mean_line_length", "mean non-empty line longer than {:g} characters",
             lambda _, t: _mean_line_length(t) > self.max_mean_line_length),
        ]
        return [_Filter(f"quality.{name}", reason.format(getattr(self, name)), rejects)
                for name, reason, rejects in rules if getattr(self, name) is not None]


def _alnum_fraction(text: str) -> float:
    if not text:
        return 1.0
    return sum(n for c, n in Counter(text).items() if _is_text_char(c)) / len(text)


@functools.lru_cache(maxsize=65536)
def _is_text_char(c: str) -> bool:
    return c.isalnum() or c.isspace() or unicodedata.category(c).startswith("M")  # marks: Indic vowel signs, accents


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _duplicate_line_fraction(text: str) -> float:
    lines = _lines(text)
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def _mean_line_length(text: str) -> float:
    lines = _lines(text)
    return sum(map(len, lines)) / len(lines) if lines else 0.0


@dataclass(frozen=True)
class LanguageRule:
    """A script check standing in for language ID: the fraction of letters whose Unicode name starts with an allowed
    script ("latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "cjk", "hiragana", "hangul", ...).
    A document without letters has fraction 0."""

    scripts: tuple[str, ...] | list[str] = ("latin",)
    min_fraction: float = 0.8

    def filter(self) -> _Filter:
        allowed = frozenset(s.upper() for s in self.scripts)
        reason = f"fewer than {self.min_fraction:.0%} of letters in the scripts {', '.join(sorted(s.lower() for s in allowed))}"
        return _Filter("language", reason, lambda _, t: script_fraction(t, allowed) < self.min_fraction)


def script_fraction(text: str, scripts: frozenset[str]) -> float:
    """Fraction of the letters of `text` in `scripts` (upper-case Unicode name prefixes such as 'LATIN')."""
    letters = [(c, n) for c, n in Counter(text).items() if c.isalpha()]
    total = sum(n for _, n in letters)
    return sum(n for c, n in letters if _script(c) in scripts) / total if total else 0.0


@functools.lru_cache(maxsize=65536)
def _script(c: str) -> str:
    words = unicodedata.name(c, "").split()
    if words and words[0] in ("FULLWIDTH", "HALFWIDTH"):  # FULLWIDTH LATIN CAPITAL LETTER A is Latin
        words = words[1:]
    return words[0] if words else ""


def _exact_filter() -> _Filter:
    exact = ExactDuplicateFilter()
    reason = "same text (sha256 after transforms) as an earlier document"
    return _Filter("exact_dedup", reason, lambda _, t: exact.is_duplicate(t))


def _near_filter(near: NearDuplicateFilter) -> _Filter:
    reason = (
        f"estimated Jaccard similarity >= {near.threshold:g} with an earlier kept document (MinHash over {near.ngram}-gram "
        f"shingles, {near.num_perm} permutations, LSH {near.bands} bands x {near.rows} rows)"
    )
    return _Filter("near_dedup", reason, lambda name, t: near.is_duplicate(name, t) is not None)
