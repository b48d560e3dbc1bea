"""The preparation pipeline: sources -> cleaning + splits -> tokenizer -> shards + manifest.

Each stage reads the previous stage's files and writes its own, so each runs alone
(llmkit prepare stage=...) and `prepare()` chains them:

    <work>/<component>/clean/{train,val,test}.jsonl   stage "clean": cleaned documents, by split
    <work>/<component>/cleaning_report.json           what each filter removed and why
    <work>/tokenizer/                                 stage "tokenizer": trained (or given) tokenizer
    <work>/<component>/{split}_NNNNN.bin              stage "encode": token shards
    <work>/manifest.json                              written last: the dataset is complete

A dataset is several weighted components (a mixture) sharing one tokenizer; a plain
single-source config is a mixture of one. `prepare()` builds into a temporary directory and
renames it into place, keyed by a fingerprint of every setting and of the source files, so a
second run reuses the shards and an interrupted one leaves nothing that looks complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llmkit.data.cleaning import Cleaner
from llmkit.data.encode import ShardWriter, encode_to_shards
from llmkit.data.files import write_json_atomic
from llmkit.data.shards import MANIFEST, MANIFEST_FORMAT, VERSION, token_dtype
from llmkit.data.sources import SOURCES, Document
from llmkit.data.splits import SPLITS, assign_splits
from llmkit.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

CLEAN_DIR, TOKENIZER_DIR, REPORT = "clean", "tokenizer", "cleaning_report.json"
COMPONENT_KEYS = ("source", "weight", "split_by")  # a component's own settings; the rest go to its source


@dataclass
class DataSpec:
    """Every setting that decides which tokens end up in the shards (nothing about batching)."""

    # name -> {"source": ..., "weight": ..., "split_by": ... (overrides `split` for this component), source options}
    components: dict[str, dict[str, Any]]
    clean: dict[str, Any] = field(default_factory=dict)
    split: str = "hash"
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_key: str = "name"
    tokenizer: str = "bpe"
    vocab_size: int = 2048
    tokenizer_options: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: str | None = None  # an existing sentencepiece .model or HF tokenizer.json
    tokenizer_train_chars: int = 200_000_000  # sentencepiece samples sentences anyway; bounds memory
    dtype: str = "auto"
    shard_tokens: int = 1 << 24

    def fingerprint(self) -> str:
        sources = {name: source_fingerprint(opts) for name, opts in sorted(self.components.items())}
        payload = json.dumps({"spec": asdict(self), "sources": sources, "format": VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def source_fingerprint(options: dict[str, Any]) -> Any:
    """Cheap identity of a source's content: file paths, sizes and mtimes for local files, the
    Python version for the stdlib corpus; other sources are identified by their options alone
    (pin a revision for Hugging Face datasets)."""
    patterns = options.get("path") or options.get("data_files")
    if options.get("source") == "hf" and options.get("dataset") and Path(str(options["dataset"])).exists():
        patterns = options["dataset"]
    stats: list[Any] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns or []):
        for file in sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True)) or [pattern]:
            path = Path(file)
            for leaf in sorted(path.rglob("*")) if path.is_dir() else [path]:
                stat = leaf.stat() if leaf.exists() else None
                stats.append([str(leaf), stat and stat.st_size, stat and stat.st_mtime_ns])
    if options.get("source") == "stdlib":
        stats.append(sys.version)
    return stats


def read_documents(options: dict[str, Any]) -> Iterator[Document]:
    opts = {k: v for k, v in options.items() if k not in COMPONENT_KEYS}
    yield from SOURCES.build(options.get("source", "text"), **opts)


# ---- stage 1-3: sources, cleaning, splits -----------------------------------------------------------
def clean_stage(spec: DataSpec, name: str, work: Path, progress: bool = True) -> dict[str, int]:
    """Read one component, clean it, split it, write clean/{split}.jsonl and the report."""
    out = work / name / CLEAN_DIR
    out.mkdir(parents=True, exist_ok=True)
    cleaner = Cleaner(**spec.clean)
    docs = tqdm(read_documents(spec.components[name]), desc=f"clean {name}", unit=" docs", disable=not progress)
    counts = dict.fromkeys(SPLITS, 0)
    with _JsonlWriters(out) as writers:
        split_by = spec.components[name].get("split_by") or spec.split
        for split, doc in assign_splits(cleaner(docs), split_by, spec.val_fraction, spec.test_fraction, spec.split_key):
            writers.write(split, doc)
            counts[split] += 1
    cleaner.report.write(work / name / REPORT)
    if counts["train"] == 0:
        raise ValueError(
            f"data component '{name}' has no training documents after cleaning and splitting: {counts}. "
            f"Filters removed: {_removed(cleaner.report.to_dict())} (details in {work / name / REPORT}); "
            "loosen data.clean, change data.val_fraction or add documents"
        )
    return counts


def _removed(report: dict[str, Any]) -> str:
    filters = report.get("filters", {})
    return ", ".join(f"{k} {v['removed']}" for k, v in filters.items() if v.get("removed")) or "none"


class _JsonlWriters:
    """One JSONL file per split, each written under a temporary name and renamed when complete."""

    def __init__(self, directory: Path) -> None:
        self.final = {split: directory / f"{split}.jsonl" for split in SPLITS}
        self.tmp = {split: path.with_name(f".{path.name}.tmp") for split, path in self.final.items()}

    def __enter__(self) -> "_JsonlWriters":
        self.files = {split: open(path, "w", encoding="utf-8") for split, path in self.tmp.items()}
        return self

    def write(self, split: str, doc: Document) -> None:
        self.files[split].write(json.dumps({"name": doc[0], "text": doc[1]}, ensure_ascii=False) + "\n")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        for file in self.files.values():
            file.close()
        for split in SPLITS:
            if exc_type is None:
                os.replace(self.tmp[split], self.final[split])
            else:
                self.tmp[split].unlink(missing_ok=True)


def read_clean(work: Path, name: str, split: str) -> Iterator[Document]:
    with open(work / name / CLEAN_DIR / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            yield record["name"], record["text"]


# ---- stage 4: tokenizer -----------------------------------------------------------------------------
def tokenizer_stage(spec: DataSpec, work: Path) -> Tokenizer:
    """Train on every component's training split (up to tokenizer_train_chars), or load the given one."""
    if spec.tokenizer_path:
        from llmkit.data.tokenizer import load_pretrained_tokenizer

        tokenizer = load_pretrained_tokenizer(spec.tokenizer_path)
    else:
        tokenizer = train_tokenizer(spec.tokenizer, _training_texts(spec, work), spec.vocab_size, **spec.tokenizer_options)
    token_dtype(tokenizer.vocab_size, spec.dtype)  # fail before encoding if ids cannot be stored
    (work / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    tokenizer.save(work / TOKENIZER_DIR)
    return tokenizer


def _training_texts(spec: DataSpec, work: Path) -> Iterator[str]:
    budget = spec.tokenizer_train_chars
    for name in sorted(spec.components):
        for _, text in read_clean(work, name, "train"):
            if budget <= 0:
                return
            yield text[:budget]
            budget -= len(text)


# ---- stage 5: encoding ------------------------------------------------------------------------------
def encode_stage(spec: DataSpec, work: Path, processes: int = 1, progress: bool = True) -> dict[str, Any]:
    """Encode every component's splits into shards; returns the manifest (also written, last)."""
    tokenizer = load_tokenizer(work / TOKENIZER_DIR)
    dtype = token_dtype(tokenizer.vocab_size, spec.dtype)
    components: dict[str, Any] = {}
    for name in sorted(spec.components):
        splits = {}
        for split in SPLITS:
            writer = ShardWriter(work / name, split, dtype, spec.shard_tokens)
            with tqdm(desc=f"encode {name}/{split}", unit=" docs", disable=not progress) as bar:
                entries = encode_to_shards(read_clean(work, name, split), tokenizer, writer, processes, progress=bar)
            for entry in entries:
                entry["file"] = f"{name}/{entry['file']}"
            splits[split] = {"tokens": sum(e["tokens"] for e in entries), "documents": writer.documents, "shards": entries}
        report = json.loads((work / name / REPORT).read_text()) if (work / name / REPORT).exists() else {}
        weight = float(spec.components[name].get("weight", 1.0))
        components[name] = {"weight": weight, "splits": splits, "cleaning": report}
    manifest = {
        "format": MANIFEST_FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_dir": TOKENIZER_DIR, "components": components,
        "spec": asdict(spec), "fingerprint": spec.fingerprint(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(work / MANIFEST, manifest)
    return manifest


# ---- all stages -------------------------------------------------------------------------------------
def dataset_dir(spec: DataSpec, root: Path, label: str) -> Path:
    return root / f"{label}-{spec.tokenizer if not spec.tokenizer_path else 'pretrained'}-{spec.fingerprint()}"


def prepare(
    spec: DataSpec, root: Path, label: str = "data", processes: int = 1, progress: bool = True, out: Path | None = None
) -> Path:
    """Run every stage unless the dataset is already there; returns its directory (`out`, when the
    caller has already computed dataset_dir: fingerprinting globs and stats every source file)."""
    out = out or dataset_dir(spec, root, label)
    if (out / MANIFEST).exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        for name in sorted(spec.components):
            clean_stage(spec, name, work, progress)
        tokenizer_stage(spec, work)
        encode_stage(spec, work, processes, progress)
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _publish(work: Path, out: Path) -> None:
    """Rename the finished build into place; if another process won the race, keep its copy."""
    try:
        os.replace(work, out)
    except OSError:
        if not (out / MANIFEST).exists():
            raise
        shutil.rmtree(work, ignore_errors=True)
