"""The subcommands of `llmkit` (llmkit/cli.py), one module each, each a Hydra app over conf/<name>.yaml.

Modules here import only Hydra at the top, so `--help` and `--cfg job` answer at once; the work's
imports (torch, lightning, ...) happen inside `main`."""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

CONFIG_PATH = "pkg://llmkit.conf"  # conf/ travels inside the package (pyproject maps llmkit.conf to it)

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def require(cfg: DictConfig, key: str, example: str) -> None:
    """Stop with a message showing how to give `key` when the config leaves it at ???."""
    if OmegaConf.is_missing(cfg, key):
        raise SystemExit(f"give {key}=...: for example {key}={example}")


def unescape(text: str) -> str:
    r"""\n, \t and \\ typed on a command line, read as the characters they name."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m[1]], text)


def pick_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def as_list(value: object) -> list:
    """A key that takes one value or a list (`stop=x` or `stop=[x,y]`) as a list."""
    if value is None:
        return []
    return list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else [value]
