"""llmkit report dir=<multirun dir>: compare the runs of a sweep (tables, seed spread, plots, W&B Report)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="report")
def main(cfg: DictConfig) -> None:
    require(cfg, "dir", "multirun/ablation-attention/<time>")
    from llmkit.report import publish_wandb_report, wandb_online, write_report

    root = Path(cfg.dir).expanduser().resolve()
    if not root.is_dir():
        raise SystemExit(f"dir={cfg.dir} is not a directory; give a multirun directory (multirun/<date>/<time>)")
    result = write_report(root, Path(cfg.out) if cfg.out else root / "report", cfg.title, cfg.note)
    out = result["out"]
    print((out / "report.md").read_text())
    print(f"\nwritten: {out / 'report.md'}, {out / 'report.html'}, {out / 'report.csv'}, {out / 'runs.csv'}")
    if cfg.wandb_project:
        if not wandb_online():
            print("W&B report skipped: offline (set WANDB_API_KEY or WANDB_MODE=online; `wandb sync` the offline runs first)")
            return
        try:
            group = cfg.wandb_group or str(root.relative_to(Path.cwd()))
        except ValueError:
            group = root.name
        publish_wandb_report(cfg.wandb_project, group, result["keys"], cfg.title or "llmkit comparison",
                             (out / "report.md").read_text(), cfg.wandb_entity)
