"""llmkit score ckpt=... pairs=...: a reward model's scores of a preference file, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, pick_device, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="score")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<reward run>/checkpoints/last.ckpt")
    require(cfg, "pairs", "pairs.jsonl")
    from llmkit.posttrain.score import score_pairs

    result = score_pairs(cfg.ckpt, cfg.pairs, cfg.batch_size, pick_device(cfg.device))
    out = Path(cfg.out or f"{cfg.pairs}.scores.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['pairs']} pairs: the chosen reply scores higher in {result['accuracy']:.1%}, mean margin "
          f"{result['mean_margin']:.3f} -> {out}")
