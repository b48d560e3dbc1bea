"""`llmkit <subcommand> [overrides]`: one console script; every subcommand is a Hydra app over conf/<name>.yaml.

The table below is the whole dispatcher: a subcommand is a module in llmkit/commands with a Hydra `main`,
imported only when chosen, so `llmkit --help` stays instant.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from llmkit.config_hints import misspelt_key_hint


@dataclass(frozen=True)
class Subcommand:
    module: str  # llmkit.commands.<module>, which has a Hydra `main`
    config: str  # conf/<config>.yaml
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("train", "train", "train a model (the default: a tiny model on an offline corpus, CPU)"),
    "prepare": Subcommand("prepare", "prepare", "prepare a dataset: sources -> cleaning -> tokenizer -> token shards"),
    "tokenizer": Subcommand("tokenizer", "tokenizer", "train a tokenizer on text files and save it"),
    "generate": Subcommand("generate", "generate", "stream text sampled from a checkpoint"),
    "evaluate": Subcommand("evaluate", "evaluate", "perplexity of a checkpoint on held-out text or a prepared split"),
    "lm-eval": Subcommand("lm_eval", "lm_eval", "lm-evaluation-harness tasks on a checkpoint (pip install llmkit[eval])"),
    "bench": Subcommand("bench", "bench", "offline benchmarks (MMLU, ARC, HellaSwag, HumanEval, your tasks), paired comparisons"),
    "export": Subcommand("export", "export", "export a checkpoint to a Hugging Face directory"),
    "import": Subcommand("import_hf", "import", "import a Hugging Face directory as a llmkit checkpoint"),
    "consolidate": Subcommand("consolidate", "consolidate", "merge a sharded (FSDP) checkpoint into one file"),
    "report": Subcommand("report", "report", "compare the runs of a multirun: table, seed spread, plots"),
    "score": Subcommand("score", "score", "score a preference file with a reward model (task=reward)"),
    "quantize": Subcommand("quantize", "quantize", "weight-only int8 of a checkpoint, for serve, generate and evaluate"),
    "serve": Subcommand("serve", "serve", "an OpenAI-compatible server: completions, chat, streaming, batching, metrics"),
    "plan": Subcommand("plan", "plan", "parameters, FLOPs, memory per rank, time and Chinchilla sizing of a run"),
    "explore": Subcommand("explore", "explore", "an offline page of a model's attention, predictions and residual stream"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return "\n".join([
        "usage: llmkit <subcommand> [key=value ...] [--help] [--cfg job] [-m]",
        "",
        "subcommands:",
        *lines,
        "",
        "Each subcommand is a Hydra app: `llmkit <subcommand> --help` lists its keys and config groups.",
    ])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmkit` console script (and of `python -m llmkit`)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise SystemExit(f"llmkit: unknown subcommand '{name}'; valid subcommands: {', '.join(SUBCOMMANDS)}\n\n{usage()}")
    run_subcommand(name, rest)


def run_subcommand(name: str, args: list[str]) -> None:
    sub = SUBCOMMANDS[name]
    app = importlib.import_module(f"llmkit.commands.{sub.module}").main
    saved, sys.argv = sys.argv, [f"llmkit {name}", *args]  # Hydra reads its overrides from sys.argv
    try:
        app()
    except SystemExit as stop:
        if stop.code == 1:  # how Hydra exits on a bad override (a command's own refusal exits with its message)
            hint = misspelt_key_hint(sub.config, args)
            if hint:
                print(hint, file=sys.stderr)
        raise
    finally:
        sys.argv = saved
