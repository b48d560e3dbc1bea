"""A small corpus for distributed-preparation tests: JSONL files (one gzipped) with exact and near duplicates planted
in other files than their originals, so that only dedup across pieces and tasks finds them. Generated, never
downloaded; shared by tests/data and tests/slurm."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

from llmkit.data.prep.pipeline import DataSpec

WORDS = [f"w{i}" for i in range(400)] + "river stone cloud alpha beta gamma delta lamp door bread".split()
FILES = 6
ORIGINALS = 90
NEAR = 12  # one word changed: Jaccard of word 5-grams about 0.9
EXACT = 6


def write_corpus(directory: Path, seed: int = 0) -> Path:
    """FILES files in `directory` (the last gzipped); each planted copy goes to another file than its original."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    originals = [" ".join(rng.choices(WORDS, k=rng.randint(120, 260))) for _ in range(ORIGINALS)]
    files: list[list[dict]] = [[] for _ in range(FILES)]
    for i, text in enumerate(originals):
        files[i % FILES].append({"id": f"doc{i}", "text": text})
    for k in range(NEAR):
        i = rng.randrange(ORIGINALS)
        words = originals[i].split()
        words[len(words) // 2] = "changed"
        files[(i % FILES + 1 + k % (FILES - 1)) % FILES].append({"id": f"near{k}_of_doc{i}", "text": " ".join(words)})
    for k in range(EXACT):
        i = rng.randrange(ORIGINALS)
        files[(i % FILES + 2) % FILES].append({"id": f"copy{k}_of_doc{i}", "text": originals[i]})
    for n, records in enumerate(files):
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if n == FILES - 1:
            with gzip.open(directory / f"part{n}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(lines)
        else:
            (directory / f"part{n}.jsonl").write_text(lines, encoding="utf-8")
    return directory


def corpus_spec(directory: Path, **overrides) -> DataSpec:
    settings = dict(
        components={"web": {"source": "jsonl", "path": str(directory / "part*.jsonl*"), "id_field": "id"}},
        clean={"near_dedup": {"threshold": 0.8}}, tokenizer="bpe", vocab_size=400, val_fraction=0.1, shard_tokens=3000,
    )
    return DataSpec(**(settings | overrides))


def dataset_digest(directory: Path) -> dict[str, str]:
    """SHA-256 of every file of a prepared dataset but the build log and the checksum stamp."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in ("prepare_log.json", ".verified.json")
    }
