"""DataSpec: every setting that decides which tokens end up in the shards, and the fingerprint that names a dataset.

How a dataset is prepared (in one process or many tasks, which engine, how many) is not part of it: the same spec
gives the same shards and manifest, byte for byte, whatever prepared them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmkit.data.shards import VERSION


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

    def split_method(self, component: str) -> str:
        return self.components[component].get("split_by") or self.split

    def split_settings(self, component: str) -> dict[str, Any]:
        return {"method": self.split_method(component), "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "key": self.split_key}


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
