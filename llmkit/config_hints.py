"""What Hydra does not say about a misspelt key: which keys are valid there, and the likely intended one.

Hydra refuses `max_new_token=5` with "Key 'max_new_token' is not in struct" and exits. The dispatcher
then calls misspelt_key_hint, which composes the config again (only on that failure path) to find the
first override naming a key the config lacks, and lists the keys of the deepest node that exists.
"""

from __future__ import annotations

import difflib
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

CONFIG_MODULE = "llmkit.conf"


def misspelt_key_hint(config_name: str, args: list[str]) -> str | None:
    """A message naming the unknown key of the first such override in args and the valid keys, or None."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # a syntax error: Hydra's own message already says where
        return None
    accepted: list[str] = []
    for text, override in zip(overrides, parsed, strict=True):
        key = override.key_or_group
        plain = not (override.is_add() or override.is_force_add() or override.is_delete())
        if plain and "/" not in key and not key.startswith("hydra."):
            base = _composes(config_name, accepted)
            hint = _unknown_key_message(base, key, config_name)
            # a key absent from the config may still be a group choice (debug=fast): only a failure counts
            if hint and _composes(config_name, [*accepted, text]) is None:
                return hint
        accepted.append(text)
    return None


def _composes(config_name: str, overrides: list[str]) -> dict[str, Any] | None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=False)
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()


def _unknown_key_message(config: dict[str, Any] | None, key: str, config_name: str) -> str | None:
    if config is None:
        return None
    node, path = config, []
    for part in key.split("."):
        if not isinstance(node, dict):
            return None  # a key below a value: Hydra's message says so
        if part not in node:
            valid = sorted(node)
            close = difflib.get_close_matches(part, valid, n=1)
            where = f" under {'.'.join(path)}" if path else ""
            guess = f"; did you mean {'.'.join([*path, close[0]])}?" if close else ""
            return (f"llmkit: '{key}' is not a key of the {config_name} config{guess}\n"
                    f"valid keys{where}: {', '.join(valid)} (add a new key with +{key}=...)")
        node, path = node[part], [*path, part]
    return None
