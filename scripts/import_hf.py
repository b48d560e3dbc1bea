"""Import a Hugging Face directory (llama, gpt2 or mixtral; safetensors weights) as a llmkit checkpoint.

  python scripts/import_hf.py hf=hf_model/ out=imported.ckpt

The checkpoint holds the model config, the weights and the tokenizer (when the directory has one
llmkit can read: tokenizer.model or llmkit_tokenizer.json), and loads with
`llmkit.checkpoint.load_checkpoint`, so scripts/generate.py and scripts/evaluate.py take it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from llmkit.hf import import_hf


def parse(argv: list[str]) -> dict[str, str]:
    args = dict(arg.partition("=")[::2] for arg in argv)
    if any("=" not in arg for arg in argv) or set(args) != {"hf", "out"} or not all(args.values()):
        raise SystemExit(f"expected hf=<Hugging Face directory> out=<checkpoint file>; got {' '.join(argv)!r}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    model, tokenizer = import_hf(args["hf"])
    checkpoint = {
        "model_config": model.cfg.to_dict(),
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "global_step": 0,
    }
    if tokenizer is not None:
        checkpoint["LMDataModule"] = {"tokenizer": tokenizer.to_state()}
    out = Path(args["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    print(f"imported {args['hf']} to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
