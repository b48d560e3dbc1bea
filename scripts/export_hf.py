"""Export a llmkit checkpoint to a Hugging Face directory (config.json + model.safetensors + tokenizer).

  python scripts/export_hf.py ckpt=outputs/<run>/checkpoints/last.ckpt out=hf_model/

Llama-compatible models become LlamaForCausalLM, GPT-2-compatible ones GPT2LMHeadModel, MoE models
with swiglu experts and a softmax router MixtralForCausalLM; anything else stops with a message
naming the part that has no Hugging Face equivalent (see llmkit/hf.py). Load the result with
`transformers.AutoModelForCausalLM.from_pretrained("hf_model/")`, and import it back with
scripts/import_hf.py.
"""

from __future__ import annotations

import sys

from llmkit.checkpoint import load_checkpoint
from llmkit.hf import ExportError, export_hf


def parse(argv: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in keys:
            raise SystemExit(f"expected key=value with key one of {', '.join(keys)}; got {arg!r}")
        args[key] = value
    missing = [k for k in keys if not args.get(k)]
    if missing:
        raise SystemExit(f"missing {', '.join(f'{k}=...' for k in missing)}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv, ("ckpt", "out"))
    loaded = load_checkpoint(args["ckpt"])
    try:
        out = export_hf(loaded.model, loaded.tokenizer, args["out"])
    except ExportError as err:
        raise SystemExit(str(err)) from None
    print(f"exported {args['ckpt']} (step {loaded.step}) to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
