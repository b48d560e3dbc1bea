"""llmkit import hf=... out=...: a Hugging Face directory as a llmkit checkpoint."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="import")
def main(cfg: DictConfig) -> None:
    require(cfg, "hf", "hf_model/")
    require(cfg, "out", "imported.ckpt")
    import torch

    from llmkit.hf import import_hf

    model, tokenizer = import_hf(cfg.hf)
    checkpoint = {
        "model_config": model.cfg.to_dict(),
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "global_step": 0,
    }
    if tokenizer is not None:
        checkpoint["LMDataModule"] = {"tokenizer": tokenizer.to_state()}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    print(f"imported {cfg.hf} to {out}")
