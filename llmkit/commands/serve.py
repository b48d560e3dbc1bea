"""llmkit serve ckpt=...: an OpenAI-compatible server over the checkpoint (llmkit/serve)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, pick_device, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="serve")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    from pathlib import Path

    if not Path(cfg.ckpt).exists():  # before the server starts: /health would only ever say "failed"
        raise SystemExit(f"ckpt={cfg.ckpt}: no such checkpoint file or int8 directory")
    try:
        import uvicorn

        from llmkit.serve.app import ServeSettings, create_app, default_model_name, load_served
    except ImportError as err:
        raise SystemExit(f"llmkit serve needs the serve extra: pip install -e '.[serve]' ({err})") from err
    if cfg.chat_template is not None:
        from llmkit.text.chat import CHAT_TEMPLATES

        CHAT_TEMPLATES.get(cfg.chat_template)  # an unknown name fails here, listing the templates
    settings = ServeSettings(model_name=cfg.model_name or default_model_name(cfg.ckpt), checkpoint=str(cfg.ckpt),
                             max_batch=cfg.max_batch,
                             max_queue=cfg.max_queue, max_tokens_limit=cfg.max_tokens_limit)

    def load():
        return load_served(cfg.ckpt, pick_device(cfg.device), cfg.quantize, cfg.backend, cfg.chat_template)

    uvicorn.run(create_app(load, settings), host=cfg.host, port=cfg.port, log_level=cfg.log_level)
