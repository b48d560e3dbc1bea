"""llmkit evaluate ckpt=... text=...|dataset=...: perplexity with a strided sliding window, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, pick_device, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    if bool(cfg.text) == bool(cfg.dataset):
        raise SystemExit("give exactly one of text=file.txt or dataset=prepared_dataset_dir")
    evaluate(cfg)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    from llmkit.checkpoint import load_for_inference
    from llmkit.evaluate import perplexity

    loaded = load_for_inference(cfg.ckpt, pick_device(cfg.device), cfg.quantize)
    ids = load_ids(cfg, loaded.tokenizer)
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    result = perplexity(loaded.model, ids, cfg.context, cfg.stride, cfg.batch_size)
    report = {**result.to_dict(), "ckpt": str(cfg.ckpt), "step": loaded.step, "quantize": cfg.quantize,
              "source": cfg.text or f"{cfg.dataset}:{cfg.split}"}
    out = Path(cfg.out or f"{cfg.ckpt}.eval.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def load_ids(cfg: DictConfig, tokenizer: Any):
    import torch

    if cfg.text:
        if tokenizer is None:
            raise SystemExit(f"{cfg.ckpt} holds no tokenizer, so text cannot be encoded; use dataset=")
        return torch.tensor(tokenizer.encode(Path(cfg.text).expanduser().read_text()), dtype=torch.long)
    from llmkit.data.prepared import PreparedDataset

    dataset = PreparedDataset.open(Path(cfg.dataset).expanduser())
    if tokenizer is not None and dataset.tokenizer.fingerprint != tokenizer.fingerprint:
        raise SystemExit(f"{cfg.dataset} was tokenized with another tokenizer than the checkpoint's")
    return torch.from_numpy(dataset.split_tokens(cfg.split))
