"""llmkit export ckpt=... out=...: a checkpoint as a Hugging Face directory."""

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    require(cfg, "out", "hf_model/")
    from llmkit.checkpoint import load_checkpoint
    from llmkit.hf import ExportError, export_hf

    loaded = load_checkpoint(cfg.ckpt)
    try:
        out = export_hf(loaded.model, loaded.tokenizer, cfg.out)
    except ExportError as err:
        raise SystemExit(str(err)) from None
    print(f"exported {cfg.ckpt} (step {loaded.step}) to {out}")
