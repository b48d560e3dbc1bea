"""Deprecated: use `llmkit export ...` (the same key=value overrides). Kept for one release."""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    print("scripts/export_hf.py is deprecated: run `llmkit export ...` instead", file=sys.stderr)
    main(["export", *sys.argv[1:]])
