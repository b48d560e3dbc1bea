"""A prepared dataset directory opened for reading: manifest, tokenizer, token streams."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.data.shards import DTYPES, ShardError, data_fingerprint, read_manifest, verify_checksums
from llmkit.data.streaming import TokenStream
from llmkit.text.tokenizer import Tokenizer, load_tokenizer


@dataclass
class PreparedDataset:
    directory: Path
    manifest: dict[str, Any]
    tokenizer: Tokenizer

    @classmethod
    def open(cls, directory: Path, verify: str = "checksum") -> "PreparedDataset":
        """Check the manifest, the tokenizer and (verify="checksum") every shard's SHA-256;
        verify="size" checks only headers and sizes, when the shards are opened."""
        if verify not in ("checksum", "size"):
            raise ValueError(f"unknown data.verify '{verify}'; valid: checksum, size")
        manifest = read_manifest(directory)
        tokenizer = load_tokenizer(directory / manifest["tokenizer_dir"])
        if tokenizer.fingerprint != manifest["tokenizer_fingerprint"]:
            raise ShardError(
                f"the tokenizer in {directory / manifest['tokenizer_dir']} (fingerprint {tokenizer.fingerprint}) is not "
                f"the one the shards were written with ({manifest['tokenizer_fingerprint']}); prepare the data again"
            )
        dataset = cls(directory, manifest, tokenizer)
        if verify == "checksum":
            verify_checksums(directory, dataset.shard_entries())
        return dataset

    @property
    def components(self) -> list[str]:
        return sorted(self.manifest["components"])

    @property
    def weights(self) -> list[float]:
        return [self.manifest["components"][c]["weight"] for c in self.components]

    @property
    def fingerprint(self) -> str:
        return data_fingerprint(self.manifest)

    def shard_entries(self) -> list[dict[str, Any]]:
        return [e for c in self.manifest["components"].values() for s in c["splits"].values() for e in s["shards"]]

    def stream(self, component: str, split: str) -> TokenStream:
        entries = self.manifest["components"][component]["splits"].get(split, {"shards": []})["shards"]
        dtype = np.dtype(DTYPES[self.manifest["dtype"]])
        return TokenStream([self.directory / e["file"] for e in entries], entries, dtype)

    def split_tokens(self, split: str) -> np.ndarray:
        """Every token of one split, component after component, as int64 (for evaluation, not training)."""
        streams = [self.stream(c, split) for c in self.components]
        return np.concatenate([s.read(0, s.total) for s in streams] or [np.zeros(0, np.int64)])

    def tokens(self, split: str) -> int:
        return sum(self.manifest["components"][c]["splits"].get(split, {"tokens": 0})["tokens"] for c in self.components)
