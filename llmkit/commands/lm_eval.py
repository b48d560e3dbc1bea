"""llmkit lm-eval ckpt=...|hf=... tasks=...: lm-evaluation-harness on a llmkit model, results as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmkit.commands import CONFIG_PATH, as_list, pick_device, require


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="lm_eval")
def main(cfg: DictConfig) -> None:
    require(cfg, "tasks", "hellaswag")
    if bool(cfg.ckpt) == bool(cfg.hf):
        raise SystemExit("give exactly one of ckpt=<llmkit checkpoint> or hf=<directory written by llmkit export>")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise SystemExit('lm-eval needs lm-evaluation-harness: pip install "llmkit[eval]"') from None
    from llmkit.lm_eval_adapter import LLMKitLM

    model = LLMKitLM(ckpt=cfg.ckpt, hf=cfg.hf, device=pick_device(cfg.device), batch_size=cfg.batch_size,
                     max_length=cfg.max_length)
    tasks = [str(t) for t in as_list(cfg.tasks)]
    include = str(Path(cfg.include_path).expanduser()) if cfg.include_path else None
    manager = TaskManager(include_path=include, include_defaults=cfg.builtin_tasks or include is None)
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
        log_samples=False, random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    print(make_table(results))
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {out}")
