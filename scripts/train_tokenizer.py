"""Train a tokenizer on text files and save it, as the data pipeline would (same trainer, same options).

  python scripts/train_tokenizer.py --input data/tinyshakespeare.txt --kind bpe --vocab-size 2048 --out tok/
  python scripts/train_tokenizer.py --input 'corpus/*.txt' --kind unigram --vocab-size 8000 --out tok/ --time

Each input file (globs allowed) is one document. Prints the vocabulary size, the training time and
whether decode(encode(text)) gives back every document; `--time` also times reading, saving and
encoding the whole input with `encode_batch`. The saved directory loads with
`llmkit.data.tokenizer.load_tokenizer(out)`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmkit.data.sources import SOURCES
from llmkit.data.tokenizer import Tokenizer, train_tokenizer


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files or globs; each file is one document")
    parser.add_argument("--kind", choices=["bpe", "unigram", "char"], default="bpe")
    parser.add_argument("--vocab-size", type=int, default=2048, help="ignored by char")
    parser.add_argument("--out", type=Path, required=True, help="directory to save the tokenizer into")
    parser.add_argument("--no-byte-fallback", action="store_true", help="unseen characters become <unk>")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--time", action="store_true", help="also time reading, saving and encoding")
    return parser.parse_args(argv)


def round_trip_failures(tok: Tokenizer, texts: list[str]) -> tuple[int, int]:
    """(documents that do not decode back exactly, total tokens), encoding in one batch."""
    batches = tok.encode_batch(texts)
    bad = sum(tok.decode(ids) != text for ids, text in zip(batches, texts, strict=True))
    return bad, sum(len(ids) for ids in batches)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    started = time.perf_counter()
    texts = [text for _, text in SOURCES.build("text", path=args.input)]
    read_s = time.perf_counter() - started

    options = {} if args.kind == "char" else {
        "byte_fallback": not args.no_byte_fallback, "character_coverage": args.character_coverage,
    }
    started = time.perf_counter()
    tok = train_tokenizer(args.kind, texts, args.vocab_size, **options)
    train_s = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tok.save(args.out)
    save_s = time.perf_counter() - started

    started = time.perf_counter()
    bad, n_tokens = round_trip_failures(tok, texts)
    encode_s = time.perf_counter() - started

    n_chars = sum(len(t) for t in texts)
    print(f"{args.kind}: vocab size {tok.vocab_size} (asked {args.vocab_size}), fingerprint {tok.fingerprint}")
    print(f"trained in {train_s:.2f} s on {len(texts)} document(s), {n_chars:,} characters; saved to {args.out}")
    lossy = " (no byte fallback: characters outside the coverage are <unk>)" if args.no_byte_fallback else ""
    print(f"round trip: {'exact' if not bad else f'{bad} of {len(texts)} documents differ{lossy}'}; "
          f"{n_tokens:,} tokens, {n_chars / max(n_tokens, 1):.2f} characters per token")
    if args.time:
        print(f"time: read {read_s:.3f} s, train {train_s:.3f} s, save {save_s:.3f} s, "
              f"encode+decode {encode_s:.3f} s ({n_tokens / max(encode_s, 1e-9):,.0f} tokens/s)")
    if bad and options.get("byte_fallback", True):  # with byte fallback (or char) every text must come back
        raise SystemExit(1)


if __name__ == "__main__":
    main()
