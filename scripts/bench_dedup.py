"""Benchmark: dedup throughput, exact (sha256) and near (MinHash + LSH), and the whole Cleaner, on this machine.

Corpora:
  1. synthetic: --docs documents of ~1-2 KB of words from a seeded vocabulary, with 10% planted near duplicates
     (1-3 words changed, or a sentence appended) and 2% planted exact copies, shuffled; it also counts the planted
     duplicates found and the distinct documents removed (a planted group that kept no document);
  2. Tiny Shakespeare split into paragraphs at blank lines (--text; skipped when the file is missing): short
     documents, hashed as character 5-grams, so several times more shingles per byte.

Passes: `exact`; `near`, as the preparation pipeline runs it: signatures in batches (llmkit/data/minhash.py), then
the LSH index in input order; `near/doc`, one signature per call (the streaming Cleaner's path); `cleaner`, the whole
Cleaner (transforms, quality rules, exact and near dedup). MB/s are per process.

  python scripts/bench_dedup.py [--docs 5000] [--text ../shared/data/tinyshakespeare.txt] [--seed 0]

About 15 seconds on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.data.cleaning import Cleaner  # noqa: E402
from llmkit.data.dedup import ExactDuplicateFilter, NearDuplicateFilter  # noqa: E402
from llmkit.data.sources import Document  # noqa: E402


def synthetic_corpus(n_docs: int, seed: int) -> list[Document]:
    """Names are '<group>/<kind>': a correct dedup keeps exactly one document per group."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    n_near, n_exact = n_docs // 10, n_docs // 50
    originals = [" ".join(rng.choices(vocab, k=rng.randint(180, 330))) for _ in range(n_docs - n_near - n_exact)]
    docs = [(f"{i}/original", text) for i, text in enumerate(originals)]
    for k in range(n_near):
        i = rng.randrange(len(originals))
        docs.append((f"{i}/near{k}", _perturb(originals[i], rng, vocab)))
    for k in range(n_exact):
        i = rng.randrange(len(originals))
        docs.append((f"{i}/exact{k}", originals[i]))
    rng.shuffle(docs)
    return docs


def _perturb(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    if rng.random() < 0.5:
        return text + " " + " ".join(rng.choices(vocab, k=rng.randint(5, 15)))
    for i in rng.sample(range(len(words)), k=rng.randint(1, 3)):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def shakespeare_paragraphs(path: Path) -> list[Document]:
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [(f"para{i}", p) for i, p in enumerate(paragraphs)]


def exact_pass(docs: list[Document]) -> list[str]:
    exact = ExactDuplicateFilter()
    return [name for name, text in docs if exact.is_duplicate(text)]


def near_pass(docs: list[Document]) -> list[str]:
    matches = NearDuplicateFilter().duplicates([name for name, _ in docs], [text for _, text in docs])
    return [name for (name, _), match in zip(docs, matches, strict=True) if match is not None]


def near_per_document_pass(docs: list[Document]) -> list[str]:
    near = NearDuplicateFilter()
    return [name for name, text in docs if near.is_duplicate(name, text) is not None]


def cleaner_pass(docs: list[Document]) -> list[str]:
    kept = {name for name, _ in Cleaner(quality={}, near_dedup={})(docs)}
    return [name for name, _ in docs if name not in kept]


def run(label: str, docs: list[Document], check_groups: bool) -> None:
    mb = sum(len(text.encode("utf-8")) for _, text in docs) / 1e6
    print(f"\n{label}: {len(docs):,} documents, {mb:.2f} MB")
    header = f"{'pass':<10} {'docs':>7} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} {'removed':>8}"
    print(header + ("  planted found  distinct removed  groups wrong" if check_groups else ""))
    passes: dict[str, Callable[[list[Document]], list[str]]] = {
        "exact": exact_pass, "near": near_pass, "near/doc": near_per_document_pass, "cleaner": cleaner_pass}
    planted = sum("/original" not in name for name, _ in docs)
    for name, fn in passes.items():
        start = time.perf_counter()
        removed = fn(docs)
        seconds = time.perf_counter() - start
        line = f"{name:<10} {len(docs):>7,} {seconds:>8.2f} {len(docs) / seconds:>9,.0f} {mb / seconds:>7.2f} {len(removed):>8,}"
        if check_groups:
            found, distinct = _recall(docs, removed)
            line += f"  {found:>7}/{planted:<5} {distinct:>16}  {_wrong_groups(docs, removed, exact_only=name == 'exact'):>12}"
        print(line)


def _recall(docs: list[Document], removed: list[str]) -> tuple[int, int]:
    """(planted duplicates found: group members removed beyond the one kept, distinct documents removed: groups
    that kept none)."""
    gone = set(removed)
    size: dict[str, int] = {}
    kept: dict[str, int] = {}
    for name, _ in docs:
        group = name.split("/")[0]
        size[group] = size.get(group, 0) + 1
        kept[group] = kept.get(group, 0) + (name not in gone)
    found = sum(size[g] - kept[g] for g in size if kept[g] >= 1)
    return found, sum(kept[g] == 0 for g in size)


def _wrong_groups(docs: list[Document], removed: list[str], exact_only: bool) -> int:
    """Planted groups that did not keep exactly one document (for exact dedup, only exact copies count as planted)."""
    gone = set(removed)
    kept: dict[tuple[str, str], int] = {}
    for name, _ in docs:
        group, kind = name.split("/")
        key = (group, kind if exact_only and kind.startswith("near") else "")  # near copies are their own group then
        kept[key] = kept.get(key, 0) + (name not in gone)
    return sum(n != 1 for n in kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    args = parser.parse_args()

    docs = synthetic_corpus(args.docs, args.seed)
    planted = sum("/near" in name for name, _ in docs), sum("/exact" in name for name, _ in docs)
    run(f"synthetic ({planted[0]} near and {planted[1]} exact duplicates planted)", docs, check_groups=True)
    if args.text.is_file():
        run(f"{args.text.name} paragraphs", shakespeare_paragraphs(args.text), check_groups=False)
    else:
        print(f"\n{args.text} not found: skipping the real-text corpus")


if __name__ == "__main__":
    main()
