"""llmkit generate ckpt=... prompt=...: stream a continuation to the terminal as it is sampled."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, as_list, pick_device, require, unescape


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    import torch

    from llmkit.checkpoint import load_for_inference
    from llmkit.generation import stream_text

    device = pick_device(cfg.device)
    loaded = load_for_inference(cfg.ckpt, device, cfg.quantize)
    if loaded.tokenizer is None:
        raise SystemExit(f"{cfg.ckpt} holds no tokenizer, so text cannot be encoded or decoded")
    prompt = unescape(str(cfg.prompt))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    pieces = stream_text(
        loaded.model, loaded.tokenizer, prompt, cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k or None, top_p=cfg.top_p, stop=[unescape(str(s)) for s in as_list(cfg.stop)],
        generator=generator, cache=cfg.cache,
    )
    write(prompt, pieces)


def write(prompt: str, pieces) -> None:
    """The prompt, then each piece the moment it is sampled (flushed: a terminal sees the text grow)."""
    sys.stdout.write(prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
