"""Deprecated: use `llmkit prepare ...` (the same key=value overrides). Kept for one release."""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    print("scripts/prepare_data.py is deprecated: run `llmkit prepare ...` instead", file=sys.stderr)
    main(["prepare", *sys.argv[1:]])
