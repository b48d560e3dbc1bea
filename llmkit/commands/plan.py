"""llmkit plan <train overrides>: parameters, FLOPs, memory and the process's peak, time and Chinchilla sizing,
in about a second (the first call on a machine also measures the process's runtime, see plan.process_baseline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import llmkit  # noqa: F401  (registers the config resolvers)
from llmkit.commands import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="plan")
def main(cfg: DictConfig) -> None:
    from llmkit import plan as planner

    setup = planner.setup_from_config(cfg)
    plan = planner.with_runtime(planner.make_plan(setup), setup)
    report = {**plan.to_dict(), **sizing(plan, setup, cfg.plan)}
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    if cfg.json:
        print(json.dumps(report, indent=2))
        return
    print(planner.describe(plan, setup))
    print(sizing_text(report))


def sizing(plan, setup, options: DictConfig) -> dict[str, Any]:
    from llmkit import plan as planner

    n = plan.active_params
    tokens = float(options.tokens or options.tokens_per_param * n)
    cfg = setup.model
    kv_context = options.kv_context or cfg.max_seq_len
    out: dict[str, Any] = {
        "tokens": tokens,
        "train_flops": plan.flops_per_token * tokens,
        "chinchilla_tokens": options.tokens_per_param * n,
        "chinchilla_loss": planner.chinchilla_loss(n, tokens),
        "kv_cache": {"context": kv_context, "batch": options.kv_batch,
                     "bytes": planner.kv_cache_bytes(cfg, kv_context, options.kv_batch, planner.param_bytes(setup.precision))},
    }
    if setup.peak_flops:
        out["time"] = {"mfu": options.mfu, "peak_flops_per_device": setup.peak_flops, "devices": setup.ranks,
                       **planner.train_time(plan, tokens, options.mfu, setup.peak_flops, setup.ranks)}
    if options.budget:
        best_n, best_d = planner.compute_optimal(float(options.budget))
        out["compute_optimal"] = {"budget": float(options.budget), "params": best_n, "tokens": best_d,
                                  "loss": planner.chinchilla_loss(best_n, best_d)}
    return out


def sizing_text(report: dict[str, Any]) -> str:
    lines = [f"training on {report['tokens']:.4g} tokens: {report['train_flops']:.4g} FLOPs; Chinchilla "
             f"(20 tokens per parameter) suggests {report['chinchilla_tokens']:.4g}; predicted loss "
             f"L(N, D) = {report['chinchilla_loss']:.3f}"]
    if "time" in report:
        t = report["time"]
        lines.append(f"time at {t['mfu']:.0%} MFU of {t['peak_flops_per_device']:.3g} FLOP/s x {t['devices']} device(s): "
                     f"{t['tokens_per_s']:,.0f} tokens/s, {t['days']:.3g} days, {t['device_hours']:.4g} device-hours")
    if "compute_optimal" in report:
        c = report["compute_optimal"]
        lines.append(f"compute-optimal for C = {c['budget']:.3g} FLOPs: N = {c['params']:.4g} parameters, "
                     f"D = {c['tokens']:.4g} tokens, L = {c['loss']:.3f}")
    return "\n".join(lines)
