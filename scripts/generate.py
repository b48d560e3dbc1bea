"""Generate text from a checkpoint, streaming it to the terminal as it is sampled.

  python scripts/generate.py ckpt=outputs/<run>/checkpoints/last.ckpt prompt="def main():"
  python scripts/generate.py ckpt=... prompt="ROMEO:" max_new_tokens=300 temperature=0.8 top_k=50 top_p=0.95 \\
      seed=1 stop="\\n\\n" stop="THE END"

Arguments are key=value pairs (defaults below); `stop` may be given several times, and \\n, \\t and
\\\\ in prompt and stop are read as escapes. temperature=0 is greedy; top_k=0 and top_p=1 are off.
Generation also stops at the tokenizer's end-of-document token. cache=false decodes without the
KV cache (every step recomputes the whole context), for comparison.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.generation import stream_text

DEFAULTS: dict[str, Any] = {
    "ckpt": None, "prompt": "", "max_new_tokens": 200, "temperature": 0.8, "top_k": 50, "top_p": 1.0,
    "seed": 1337, "stop": [], "device": "cuda" if torch.cuda.is_available() else "cpu", "cache": True,
}


def parse(argv: list[str]) -> dict[str, Any]:
    args = {k: list(v) if isinstance(v, list) else v for k, v in DEFAULTS.items()}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in DEFAULTS:
            raise SystemExit(f"expected key=value with key one of {', '.join(DEFAULTS)}; got {arg!r}")
        args[key] = _convert(key, value)
    if not args["ckpt"]:
        raise SystemExit("give the checkpoint: ckpt=path/to/last.ckpt")
    return args


def _convert(key: str, value: str) -> Any:
    default = DEFAULTS[key]
    if key in ("prompt", "stop"):
        text = re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], value)
        return [*default, text] if isinstance(default, list) else text
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise SystemExit(f"{key}= takes true or false, got {value!r}")
        return value.lower() == "true"
    try:
        return type(default)(value) if default is not None else value
    except ValueError:
        raise SystemExit(f"{key}= takes a {type(default).__name__}, got {value!r}") from None


def main(argv: list[str]) -> None:
    args = parse(argv)
    loaded = load_checkpoint(args["ckpt"], map_location=args["device"])
    if loaded.tokenizer is None:
        raise SystemExit(f"{args['ckpt']} holds no tokenizer, so text cannot be encoded or decoded")
    generator = torch.Generator(device=args["device"]).manual_seed(args["seed"])
    pieces = stream_text(
        loaded.model, loaded.tokenizer, args["prompt"], args["max_new_tokens"], temperature=args["temperature"],
        top_k=args["top_k"] or None, top_p=args["top_p"], stop=args["stop"], generator=generator, cache=args["cache"],
    )
    sys.stdout.write(args["prompt"])
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
