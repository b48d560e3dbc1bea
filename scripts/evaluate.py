"""Perplexity of a checkpoint on held-out data, with a strided sliding window; results as JSON.

  python scripts/evaluate.py ckpt=outputs/<run>/checkpoints/last.ckpt text=held_out.txt
  python scripts/evaluate.py ckpt=... data=data_cache/stdlib-bpe-917db8fa0cc0 split=val stride=128 out=eval.json

text= is tokenized with the checkpoint's tokenizer; data= is a prepared dataset directory (train.py's
data.cache_dir/<name>, or scripts/prepare_data.py's output; split= train, val or test, every component
in turn), whose tokenizer must be the checkpoint's. context defaults to the model's
max_seq_len, stride to half of it (each token is scored once, with at least context - stride tokens
of left context; see llmkit/evaluate.py). max_tokens= evaluates a prefix only. The JSON (also
printed) holds tokens, nll (nats per token), ppl, context, stride, windows and the inputs; it is
written to out=, by default next to the checkpoint as <ckpt>.eval.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from llmkit.checkpoint import load_checkpoint
from llmkit.evaluate import perplexity

DEFAULTS: dict[str, Any] = {
    "ckpt": None, "text": None, "data": None, "split": "val", "context": 0, "stride": 0, "batch_size": 8,
    "max_tokens": 0, "out": None, "device": "cuda" if torch.cuda.is_available() else "cpu",
}


def parse(argv: list[str]) -> dict[str, Any]:
    args = dict(DEFAULTS)
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in DEFAULTS:
            raise SystemExit(f"expected key=value with key one of {', '.join(DEFAULTS)}; got {arg!r}")
        try:
            args[key] = int(value) if isinstance(DEFAULTS[key], int) else value
        except ValueError:
            raise SystemExit(f"{key}= takes an integer, got {value!r}") from None
    if not args["ckpt"]:
        raise SystemExit("give the checkpoint: ckpt=path/to/last.ckpt")
    if bool(args["text"]) == bool(args["data"]):
        raise SystemExit("give exactly one of text=file.txt or data=prepared_dataset_dir")
    return args


def load_ids(args: dict[str, Any], tokenizer: Any) -> torch.Tensor:
    if args["text"]:
        if tokenizer is None:
            raise SystemExit(f"{args['ckpt']} holds no tokenizer, so text cannot be encoded; use data=")
        return torch.tensor(tokenizer.encode(Path(args["text"]).expanduser().read_text()), dtype=torch.long)
    from llmkit.data.prepared import PreparedDataset

    dataset = PreparedDataset.open(Path(args["data"]).expanduser())
    if tokenizer is not None and dataset.tokenizer.fingerprint != tokenizer.fingerprint:
        raise SystemExit(f"{args['data']} was tokenized with another tokenizer than the checkpoint's")
    return torch.from_numpy(dataset.split_tokens(args["split"]))


def main(argv: list[str]) -> dict[str, Any]:
    args = parse(argv)
    loaded = load_checkpoint(args["ckpt"], map_location=args["device"])
    ids = load_ids(args, loaded.tokenizer)
    if args["max_tokens"]:
        ids = ids[: args["max_tokens"]]
    result = perplexity(loaded.model, ids, args["context"] or None, args["stride"] or None, args["batch_size"])
    report = {**result.to_dict(), "ckpt": str(args["ckpt"]), "step": loaded.step,
              "source": args["text"] or f"{args['data']}:{args['split']}"}
    out = Path(args["out"] or f"{args['ckpt']}.eval.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
