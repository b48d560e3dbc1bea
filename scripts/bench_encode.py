"""Benchmark: tokenizer training and shard encoding throughput, on this machine.

Prints:
  1. sentencepiece training time on Tiny Shakespeare (BPE and unigram, --vocab pieces; char for scale);
  2. encoding throughput into shards (llmkit/data/encode.py) in MB/s of UTF-8 text and tokens/s, with
     1 and 2 processes side by side on the same documents, and the ratio; the shards of both runs are
     checked to be byte-identical.

The encoding corpus is the offline default corpus (pydoc topics + standard-library sources) plus Tiny
Shakespeare cut into paragraphs, repeated --repeat times (each copy renamed, so it is real work).

  python scripts/bench_encode.py [--text ../shared/data/tinyshakespeare.txt] [--repeat 3] [--vocab 2048]

About a minute on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.data.encode import ShardWriter, encode_to_shards  # noqa: E402
from llmkit.data.sources import Document, stdlib_corpus  # noqa: E402
from llmkit.text.tokenizer import train_tokenizer  # noqa: E402


def tokenizer_training(text: str, vocab: int) -> dict[str, float]:
    seconds = {}
    for kind in ("bpe", "unigram", "char"):
        start = time.perf_counter()
        train_tokenizer(kind, [text], vocab)
        seconds[kind] = time.perf_counter() - start
    return seconds


def corpus(text: str, repeat: int) -> list[Document]:
    base = list(stdlib_corpus()) + [(f"shakespeare:{i}", p) for i, p in enumerate(text.split("\n\n")) if p.strip()]
    return [(f"{copy}/{name}", body) for copy in range(repeat) for name, body in base]


def encode(docs: list[Document], tokenizer, processes: int, out: Path, threads: int = -1) -> tuple[float, int, list[str]]:
    out.mkdir()
    tokenizer.encode_threads = threads
    writer = ShardWriter(out, "train", np.dtype(np.uint16), 1 << 22)
    start = time.perf_counter()
    entries = encode_to_shards(docs, tokenizer, writer, processes=processes)
    seconds = time.perf_counter() - start
    return seconds, sum(e["tokens"] for e in entries), [e["sha256"] for e in entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    if not args.text.exists():
        sys.exit(f"no text at {args.text}; pass --text /path/to/tinyshakespeare.txt")
    text = args.text.read_text(encoding="utf-8")

    print(f"1. sentencepiece training on {args.text.name} ({len(text):,} characters), vocab {args.vocab}")
    for kind, seconds in tokenizer_training(text, args.vocab).items():
        print(f"   {kind:8s} {seconds:7.2f} s")

    docs = corpus(text, args.repeat)
    megabytes = sum(len(body.encode("utf-8")) for _, body in docs) / 1e6
    tokenizer = train_tokenizer("bpe", [text], args.vocab)
    print(f"\n2. encoding {len(docs):,} documents, {megabytes:.1f} MB, BPE {args.vocab}, shards of 4M tokens")
    print(f"   {'run':44s} {'seconds':>8} {'MB/s':>7} {'tokens/s':>11} {'vs serial':>10}")
    runs = {
        "1 process, 1 sentencepiece thread": (1, 1),
        "1 process, sentencepiece threads (default)": (1, -1),
        "2 processes, 1 thread each": (2, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: encode(docs, tokenizer, p, Path(tmp) / str(i), t) for i, (name, (p, t)) in enumerate(runs.items())}
    serial = next(iter(results.values()))[0]
    for name, (seconds, tokens, _) in results.items():
        print(f"   {name:44s} {seconds:8.2f} {megabytes / seconds:7.2f} {tokens / seconds:11,.0f} {serial / seconds:9.2f}x")
    same = len({tuple(r[2]) for r in results.values()}) == 1
    print(f"   shards identical in every run: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
