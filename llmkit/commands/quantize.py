"""llmkit quantize ckpt=... out=...: an int8 directory that serve, generate and evaluate load as it is."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="quantize")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    require(cfg, "out", "model-int8")
    from pathlib import Path

    from llmkit.checkpoint import load_checkpoint
    from llmkit.quantize import int8_names, quantize_model, save_quantized

    if Path(cfg.out).exists():
        raise SystemExit(f"{cfg.out} exists; choose another out= (nothing was overwritten)")
    loaded = load_checkpoint(cfg.ckpt)
    model = quantize_model(loaded.model, backend="reference", include_head=cfg.include_head)
    extra = {"step": loaded.step, "source": str(cfg.ckpt), "chat_template": loaded.checkpoint.get("chat_template")}
    out = save_quantized(model, loaded.tokenizer, cfg.out, extra)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{len(int8_names(model))} Linear layers in int8 -> {out} ({size / 1e6:.2f} MB)")
