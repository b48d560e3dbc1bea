"""Deprecated: use `llmkit import ...` (the same key=value overrides). Kept for one release."""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    print("scripts/import_hf.py is deprecated: run `llmkit import ...` instead", file=sys.stderr)
    main(["import", *sys.argv[1:]])
