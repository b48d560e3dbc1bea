"""llmkit tokenizer input=... out=...: train a tokenizer as the data pipeline would (same trainer, same options)."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, as_list, require

KINDS = ("bpe", "unigram", "char")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="tokenizer")
def main(cfg: DictConfig) -> None:
    require(cfg, "input", "'corpus/*.txt'")
    require(cfg, "out", "tok/")
    if cfg.kind not in KINDS:
        raise SystemExit(f"unknown kind '{cfg.kind}'; valid: {', '.join(KINDS)}")
    from llmkit.data.sources import SOURCES
    from llmkit.text.tokenizer import train_tokenizer

    started = time.perf_counter()
    texts = [text for _, text in SOURCES.build("text", path=[str(p) for p in as_list(cfg.input)])]
    read_s = time.perf_counter() - started
    options = {} if cfg.kind == "char" else {
        "byte_fallback": cfg.byte_fallback, "character_coverage": cfg.character_coverage,
    }
    started = time.perf_counter()
    tok = train_tokenizer(cfg.kind, texts, cfg.vocab_size, **options)
    train_s = time.perf_counter() - started
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tok.save(out)
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    bad, n_tokens = round_trip_failures(tok, texts)
    encode_s = time.perf_counter() - started

    n_chars = sum(len(t) for t in texts)
    print(f"{cfg.kind}: vocab size {tok.vocab_size} (asked {cfg.vocab_size}), fingerprint {tok.fingerprint}")
    print(f"trained in {train_s:.2f} s on {len(texts)} document(s), {n_chars:,} characters; saved to {out}")
    lossy = " (no byte fallback: characters outside the coverage are <unk>)" if not cfg.byte_fallback else ""
    print(f"round trip: {'exact' if not bad else f'{bad} of {len(texts)} documents differ{lossy}'}; "
          f"{n_tokens:,} tokens, {n_chars / max(n_tokens, 1):.2f} characters per token")
    if cfg.time:
        print(f"time: read {read_s:.3f} s, train {train_s:.3f} s, save {save_s:.3f} s, "
              f"encode+decode {encode_s:.3f} s ({n_tokens / max(encode_s, 1e-9):,.0f} tokens/s)")
    if bad and options.get("byte_fallback", True):  # with byte fallback (or char) every text must come back
        raise SystemExit(f"{bad} document(s) did not decode back to their text")


def round_trip_failures(tok, texts: list[str]) -> tuple[int, int]:
    """(documents that do not decode back exactly, total tokens), encoding in one batch."""
    batches = tok.encode_batch(texts)
    bad = sum(tok.decode(ids) != text for ids, text in zip(batches, texts, strict=True))
    return bad, sum(len(ids) for ids in batches)
