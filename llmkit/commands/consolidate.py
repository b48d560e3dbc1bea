"""llmkit consolidate ckpt=<sharded dir> out=<file>: one checkpoint file for inference and export."""

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="consolidate")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "runs/<run>/checkpoints/last.ckpt")
    require(cfg, "out", "model.ckpt")
    from llmkit.checkpoint import consolidate, load_checkpoint

    out = consolidate(cfg.ckpt, cfg.out)
    loaded = load_checkpoint(out)  # proves the file loads (weights_only) before reporting success
    print(f"wrote {out}: step {loaded.step}, {loaded.model.num_params():,} parameters")
