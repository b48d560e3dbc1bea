"""llmkit explore ckpt=... prompt=...: an offline page of a model's attention, predictions and residual stream."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, pick_device, require, unescape


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="explore")
def main(cfg: DictConfig) -> None:
    require(cfg, "ckpt", "outputs/<run>/checkpoints/last.ckpt")
    from llmkit.checkpoint import load_checkpoint
    from llmkit.explore.page import payload, render

    loaded = load_checkpoint(cfg.ckpt, map_location=pick_device(cfg.device))
    if loaded.tokenizer is None:
        raise SystemExit(f"{cfg.ckpt} holds no tokenizer, so the prompt cannot be encoded")
    prompt, options = unescape(str(cfg.prompt)), {"top_k": cfg.top_k, "induction_length": cfg.induction_length}
    if cfg.serve:
        from llmkit.explore.server import make_server

        server = make_server(loaded.model, loaded.tokenizer, prompt, cfg.host, cfg.port, **options)
        print(f"serving the explorer on http://{cfg.host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return
    started = time.perf_counter()
    try:
        html = render(payload(loaded.model, loaded.tokenizer, prompt, **options))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    out = Path(cfg.out)
    out.write_text(html)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - started:.2f} s): open it in a browser")
