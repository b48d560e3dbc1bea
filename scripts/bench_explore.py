"""Benchmark: the explorer page for a 4-layer, 4-head model (d_model 128) at 256 tokens: time to trace and
write it, its size, and the time headless Chromium takes to render it (when chromium and Playwright exist).

  python scripts/bench_explore.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llmkit.explore.page import payload, render
from llmkit.model import ModelConfig, Transformer
from llmkit.text.tokenizer import CharTokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    text = Path(torch.__file__).read_text()[: args.tokens]  # any text of that many characters
    tok = CharTokenizer.train([text])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4, max_seq_len=args.tokens))
    started = time.perf_counter()
    html = render(payload(model, tok, text))
    out = Path(tempfile.mkdtemp()) / "explore.html"
    out.write_text(html)
    write_s = time.perf_counter() - started
    print(f"{len(tok.encode(text))} tokens, 4 layers x 4 heads: page written in {write_s:.2f} s, "
          f"{out.stat().st_size / 1e6:.2f} MB (goals: under 2 s, under 5 MB)")
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        chromium = None
    if chromium:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new", "--disable-gpu"])
            page = browser.new_page()
            started = time.perf_counter()
            page.goto(out.as_uri())
            page.wait_for_selector(".thumb")
            print(f"headless Chromium: loaded and rendered in {time.perf_counter() - started:.2f} s")
            browser.close()


if __name__ == "__main__":
    main()
